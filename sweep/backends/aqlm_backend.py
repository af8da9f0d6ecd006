"""The `aqlm` package's format and kernels for AQLM-quantized layers (sweep/quant/aqlm.py finds them).

A quantized linear becomes aqlm's `QuantizedLinear` (codes [out, in/g, M] as signed ints, codebooks
[M, 2**nbits, 1, g], scales [out, 1, 1, 1]); the model is saved with transformers' `AqlmConfig` as
its quantization config and reloaded by transformers' AQLM integration, so the run measures the
checkpoint a user would load. Which kernel runs a layer is aqlm's choice, by device and codebook
shape (`aqlm.inference_kernels.get_forward_pass_kernel`): on CUDA its CUDA kernels for 1x16, 2x8 and
1x8 codebooks of 8-wide groups (built with nvcc on first use), Triton otherwise; on CPU its numba
lookup-table kernel for 8-bit codebooks, float32 only and one token row per call, so on CPU the
layers run aqlm's own dequantize-then-matmul (`dequantize_gemm`) instead, set here and named in the
kernel tag.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Iterable

import torch
from torch import nn

from sweep.backends.checkpoint import save_for_backend

NBITS_RANGE = range(1, 17)   # aqlm stores codes in int8 up to 8 bits per codebook, int16 up to 16
CUDA_KERNEL_SHAPES = {(1, 16): "code1x16", (2, 8): "code2x8", (1, 8): "code1x8"}  # (codebooks, nbits), groups of 8


def packed_linear(linear: nn.Linear, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                  nbits: int, dtype: torch.dtype) -> nn.Module:
    """aqlm's QuantizedLinear holding `codes` (non-negative ints), `codebooks` [M, 2**nbits, g] and
    per-row `scales`, its float tensors in `dtype`, on the linear's device."""
    from aqlm import QuantizedLinear
    from aqlm.utils import pack_int_data

    num_codebooks, _, in_group_size = codebooks.shape
    device = linear.weight.device
    module = QuantizedLinear(linear.in_features, linear.out_features, in_group_size=in_group_size, out_group_size=1,
                             num_codebooks=num_codebooks, nbits_per_codebook=nbits, bias=linear.bias is not None,
                             device=device, dtype=dtype)
    module.codes.data = pack_int_data(codes.clone(), nbits).to(device)
    module.codebooks.data = codebooks[:, :, None, :].to(device=device, dtype=dtype)
    module.scales.data = scales[:, None, None, None].to(device=device, dtype=dtype)
    if linear.bias is not None:
        module.bias.data = linear.bias.data.to(dtype)
    return module


def storage_bits(module: nn.Module) -> float:
    """Bits per weight the module stores: codes at their integer width, codebooks and scales."""
    stored = sum(t.numel() * t.element_size() * 8 for t in (module.codes, module.codebooks, module.scales))
    return stored / (module.in_features * module.out_features)


def save(model: nn.Module, tokenizer, directory: str, num_codebooks: int, nbits: int, in_group_size: int,
         unquantized: Iterable[str]) -> str:
    """A checkpoint transformers loads with its AQLM integration: the model with QuantizedLinears in
    place, and `quantization_config` naming the linears left as they were. Call before any forward
    on CPU: aqlm's CPU kernel permutes a module's codes in place on its first call."""
    from transformers import AqlmConfig

    # transformers matches these as regular expressions: escape the dots of module names.
    keep = [re.escape(name) + "$" for name in sorted(unquantized)]
    model.config.quantization_config = AqlmConfig(
        in_group_size=in_group_size, out_group_size=1, num_codebooks=num_codebooks, nbits_per_codebook=nbits,
        linear_weights_not_to_quantize=keep).to_dict()
    try:
        return save_for_backend(model, tokenizer, directory)
    finally:
        del model.config.quantization_config


def reload(directory: str, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map={"": device}).eval()


def use_kernels(model: nn.Module, device: str) -> str:
    """Leave each QuantizedLinear to aqlm's kernel selector on CUDA; on CPU give it aqlm's
    dequantize-then-matmul for every call. Returns the kernel tag."""
    from aqlm import QuantizedLinear

    kernels: Dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            if not device.startswith("cuda"):
                _dequantizing(module)
            kernels[name] = kernel_name(module, device)
    return "; ".join(f"{k} ({n} layers)" for k, n in Counter(kernels.values()).most_common()) or "none"


def _dequantizing(module: nn.Module) -> None:
    """aqlm's numba CPU kernel takes float32 only and goes one token row at a time (an evaluation
    window of 256 tokens is 256 calls), and it wants the codes permuted in place: set aqlm's
    `dequantize_gemm` for every call instead, before the first call could permute them."""
    from aqlm.inference import _get_autograd_matmul_op
    from aqlm.inference_kernels.dequantization import dequantize_gemm

    op = _get_autograd_matmul_op(dequantize_gemm, dequantize_gemm)  # inference only: backward never runs
    module.gemv_op = module.gemm_op = op
    module.use_gemv_rule = _always


def _always(_input) -> bool:
    return True


def kernel_name(module: nn.Module, device: str) -> str:
    """The kernel that runs this module: aqlm's selector's batch-1 choice on CUDA, dequantize_gemm on CPU."""
    if not device.startswith("cuda"):
        return "aqlm dequantize_gemm (CPU)"
    num_codebooks, codebook_size, out_group_size, in_group_size = module.codebooks.shape
    nbits = codebook_size.bit_length() - 1
    shape = CUDA_KERNEL_SHAPES.get((num_codebooks, nbits))
    if shape and out_group_size == 1 and in_group_size in ((8, 16) if nbits == 16 else (8,)):
        return f"aqlm CUDA {shape}_matmat"
    return "aqlm Triton matmul"
