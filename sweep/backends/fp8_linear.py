"""Packed FP8 linears for CUDA GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper).

Two modules replace an nn.Linear, both holding float8_e4m3fn codes (1 byte per weight) and float32
scales (sweep/quant/fp8.py):

- `Fp8WeightOnlyLinear` (W8A16): activations stay in the model's dtype; the codes are dequantized
  into that dtype on every call and multiplied by a regular matmul. Per-channel or per-group scales.
- `Fp8DynamicLinear` (W8A8): each call quantizes its input to FP8 with one scale per token and
  multiplies FP8 by FP8 on the tensor cores through `torch._scaled_mm` with row-wise scales (a
  column of per-token scales for the input, a row of per-channel scales for the weight; per-group
  weight scales have no such layout, so W8A8 needs `group_size=-1`). `_scaled_mm` wants the weight
  operand column-major: the (out, in) row-major codes, transposed as a view, are exactly that.

This is the GPU branch of method=fp8; CPUs run the same arithmetic simulated (quantize-dequantize)
in sweep/methods/fp8.py. Written for the H200 and not yet run on one: the GPU tests exercise
it (tests/test_hqq_quanto_fp8.py) where CUDA capability >= 8.9 is present and skips, saying so, elsewhere.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from sweep.quant.fp8 import dequantize_weight, quantize_per_token, quantize_weight

MIN_CAPABILITY = (8, 9)
# torch._scaled_mm needs both matrix dimensions of the weight divisible by 16.
SCALED_MM_MULTIPLE = 16
# Row-wise scaled _scaled_mm writes bfloat16; the result is cast to the activations' dtype.
SCALED_MM_OUT_DTYPE = torch.bfloat16


def has_fp8_tensor_cores(device: str) -> bool:
    """Whether `device` is a CUDA GPU whose tensor cores multiply FP8 (capability >= 8.9)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= MIN_CAPABILITY


def scaled_mm_shape_errors(in_features: int, out_features: int) -> List[str]:
    return [f"{what} {n} is not divisible by {SCALED_MM_MULTIPLE}"
            for what, n in (("in_features", in_features), ("out_features", out_features)) if n % SCALED_MM_MULTIPLE]


class _Fp8Linear(nn.Module):
    """FP8 codes and float32 scales of one linear layer, plus its bias in the model's dtype."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        codes, scales = quantize_weight(linear.weight.data, group_size)
        self.register_buffer("weight_fp8", codes.contiguous())
        self.register_buffer("weight_scale", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight_fp8, self.weight_scale, self.group_size, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Fp8WeightOnlyLinear(_Fp8Linear):
    """W8A16: FP8 storage, dequantized to the activations' dtype for each matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


class Fp8DynamicLinear(_Fp8Linear):
    """W8A8: per-token FP8 activations times per-channel FP8 weights on the tensor cores."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        if group_size != -1:
            raise ValueError("W8A8 FP8 needs per-channel weight scales (group_size=-1): torch._scaled_mm "
                             "scales whole rows and columns")
        problems = scaled_mm_shape_errors(linear.in_features, linear.out_features)
        if problems:
            raise ValueError(f"torch._scaled_mm cannot run this layer: {'; '.join(problems)}")
        super().__init__(linear, group_size)
        # (out, 1) → (1, out): the weight operand's scales, one per output column of the product.
        self.register_buffer("weight_scale_row", self.weight_scale.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, token_scales = quantize_per_token(rows)
        out = torch._scaled_mm(codes, self.weight_fp8.t(), scale_a=token_scales, scale_b=self.weight_scale_row,
                               out_dtype=SCALED_MM_OUT_DTYPE)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


KERNELS = {
    "none": (Fp8WeightOnlyLinear, "fp8 weight-only: float8_e4m3fn codes dequantized per call, then matmul"),
    "dynamic": (Fp8DynamicLinear, "torch._scaled_mm row-wise FP8 x FP8 (per-token activation scales)"),
}


def pack_linear(linear: nn.Linear, group_size: int, activations: str) -> nn.Module:
    """The packed FP8 module that replaces `linear` (activations: none = W8A16, dynamic = W8A8)."""
    cls, _ = KERNELS[activations]
    return cls(linear, group_size)
