"""FP8 (e4m3) arithmetic in plain torch: scales, quantize, dequantize, for weights and activations.

The format Hopper's tensor cores multiply: `torch.float8_e4m3fn` (4 exponent bits, 3 mantissa bits,
no infinities, largest finite value 448). A weight is stored as codes = fp8(w / s) with one float32
scale s = amax / 448 per output channel (`group_size=-1`) or per `group_size` input columns (the
last group ragged when group_size does not divide in_features, as in RTN). Activations get one
scale per token, computed on the fly (dynamic quantization), as `torch._scaled_mm` consumes them.

Scales are float32 because `torch._scaled_mm` takes float32 scales; that is also what the packed
format stores (`storage_bits`).
"""
from __future__ import annotations

from typing import Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448.0
SCALE_DTYPE = torch.float32
SCALE_BITS = 32
# A group of zeros would get scale 0 (and 0/0 codes): keep the scale above this instead.
MIN_SCALE = 1e-12


def group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def column_groups(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The scale column each input column uses (0 everywhere for per-channel scales)."""
    columns = torch.arange(in_features, device=device)
    return torch.zeros_like(columns) if group_size == -1 else columns // group_size


def quantize_weight(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight → (fp8 codes of shape (out, in), float32 scales of shape (out, groups))."""
    w = weight.float()
    out_features, in_features = w.shape
    groups = group_count(in_features, group_size)
    step = in_features if group_size == -1 else group_size
    scales = torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=w.device)
    for g in range(groups):
        block = w[:, g * step:(g + 1) * step]
        scales[:, g] = (block.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    codes = (w / scales[:, column_groups(in_features, group_size, w.device)]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 codes and their scales → the weight they stand for, in `dtype`."""
    expanded = scales[:, column_groups(codes.shape[1], group_size, codes.device)]
    return (codes.to(SCALE_DTYPE) * expanded).to(dtype)


def qdq_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize through float8_e4m3fn: the values a packed FP8 model computes with."""
    codes, scales = quantize_weight(weight, group_size)
    return dequantize_weight(codes, scales, group_size, weight.dtype)


def quantize_per_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(..., features) activations → (fp8 codes, float32 scales of shape (..., 1)): one scale per token."""
    scales = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def qdq_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 quantize-dequantize of activations, in their own dtype."""
    codes, scales = quantize_per_token(x)
    return (codes.to(SCALE_DTYPE) * scales).to(x.dtype)


def storage_bits(in_features: int, group_size: int) -> float:
    """Bits per weight of the packed format: an 8-bit code plus a float32 scale per group."""
    return 8 + group_count(in_features, group_size) * SCALE_BITS / in_features
