"""optimum-quanto: nn.Linear → quanto's QLinear with frozen (packed) int2/int4/int8 or float8 weights.

Which kernel runs a frozen weight is quanto's choice, by the class of tensor it picks for the
device, dtype and group size (`kernel_of`):
- int4, group 128, bfloat16, CPU or CUDA sm80+ (CUDA 12.1+): TinyGemmWeightQBitsTensor, torch's int4
  matmul (`aten._weight_int4pack_mm` / `_weight_int4pack_mm_for_cpu`);
- int4, group 128, float16, CUDA sm80+ with quanto's CUDA extension: AWQWeightQBitsTensor (AWQ GEMM);
- other int2/int4 weights: WeightQBitsTensor, uint8-packed codes unpacked (quanto's C++/CUDA extension,
  compiled on first use) and dequantized per call, then a matmul;
- int8: WeightQBytesTensor: `aten._weight_int8pack_mm` for bfloat16 activations on CPU, else the
  codes scaled back per call and multiplied; float8: WeightQBytesTensor (CUDA: Marlin FP8 where quanto's
  extension builds), dequantized per call otherwise.

quanto picks a group size itself (128, else the next multiple of 32 below it that divides
in_features); here the run's group size takes 128's place in that rule, and the size each layer got
is recorded. 8-bit weights have one scale per output channel (quanto has no 8-bit groups).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional

import torch
from torch import nn

from sweep.backends.checkpoint import load_quantized_state, read_manifest, save_quantized_state
from sweep.infra.tensors import tensor_bytes

QUANTO_BITS = (2, 4, 8)
WEIGHT_TYPES = ("int", "float8")
GROUP_STEP = 32           # quanto's own rule steps down from 128 in 32s, and stops at 32
OPTIMIZERS = ("auto", "hqq")
MANIFEST = "quanto_layers.json"

# What runs the matmul of a frozen weight, by the tensor class quanto chose for it.
KERNELS = {
    "TinyGemmWeightQBitsTensor": "aten._weight_int4pack_mm (tinygemm int4)",
    "AWQWeightQBitsTensor": "AWQ int4 GEMM (quanto CUDA extension)",
    "MarlinInt4WeightQBitsTensor": "Marlin int4 GEMM (quanto CUDA extension)",
    "MarlinF8QBytesTensor": "Marlin FP8 GEMM (quanto CUDA extension)",
    "WeightQBitsTensor": "unpack + dequantize per call (quanto extension), then matmul",
}


# The newest optimum-quanto whose packed weights were seen failing under torch.compile (H200, torch 2.11, tenth
# visit: a fake-tensor error on its int4 weights, "'TinyGemmWeightQBitsTensor' object has no attribute '_scale'"
# from inductor, and MarlinF8QBytesTensor in dynamo's linear). Later releases are given the benefit of the doubt.
LAST_UNCOMPILABLE = (0, 2, 7)


def quanto_version() -> str:
    from importlib.metadata import version

    return version("optimum-quanto")


def compiles_under_dynamo() -> bool:
    """Whether the installed optimum-quanto's packed weights are expected to compile (see LAST_UNCOMPILABLE)."""
    release = tuple(int(part) for part in quanto_version().split(".")[:3] if part.isdigit())
    return release > LAST_UNCOMPILABLE


def qtype_name(bits: int, weight_type: str) -> str:
    return "qfloat8_e4m3fn" if weight_type == "float8" else f"qint{bits}"


def group_size_for(in_features: int, bits: int, group_size: int) -> int:
    """quanto's rule with the run's group size as its start: that size if it divides in_features, else
    the largest size 32 k below it that does; -1 (one scale per output channel) for 8 bits, for
    group_size=-1, and when no size divides."""
    if bits == 8 or group_size == -1:
        return -1
    size = group_size
    while in_features % size and size > GROUP_STEP:
        size -= GROUP_STEP
    return size if in_features % size == 0 else -1


def _optimizer(name: str, bits: int):
    """None lets quanto choose (absmax at 8 bits, max below); hqq is quanto's HQQ optimizer (2/4 bits)."""
    if name == "auto" or bits == 8:
        return None
    from optimum.quanto.tensor.optimizers import HqqOptimizer

    return HqqOptimizer()


def _qlinear(linear: nn.Linear, qtype: str, group_size: int, optimizer: str = "auto") -> nn.Module:
    """quanto's QLinear for `linear`, its group size set before any weight is quantized (not frozen)."""
    from optimum.quanto import qtypes
    from optimum.quanto.nn import quantize_module

    bits = qtypes[qtype].bits
    module = quantize_module(linear, weights=qtypes[qtype], optimizer=_optimizer(optimizer, bits))
    if bits < 8:
        module.weight_group_size = None if group_size == -1 else group_size
    return module


def quantize_linear(linear: nn.Linear, qtype: str, group_size: int, optimizer: str) -> nn.Module:
    """A frozen QLinear: its weight replaced by quanto's packed codes and scales."""
    module = _qlinear(linear, qtype, group_size, optimizer)
    module.freeze()
    return module


def dequantized(module: nn.Module) -> torch.Tensor:
    return module.weight.dequantize()


def storage_bits(module: nn.Module) -> float:
    """Bits per weight the frozen weight holds (codes, scales, shifts), measured."""
    return tensor_bytes(module.weight) * 8 / module.weight.numel()


def kernel_of(module: nn.Module, device: str) -> str:
    """The kernel that runs this frozen module's matmul: quanto's tensor class, and for 8-bit weights
    the dispatch quanto's qbytes_mm makes on the activations' dtype."""
    weight = module.weight
    cls = type(weight).__name__
    if cls != "WeightQBytesTensor":
        return KERNELS.get(cls, cls)
    if weight.qtype.is_floating_point:
        return "float8 codes scaled back per call, then matmul"
    if device == "cpu" and weight.dtype == torch.bfloat16 and module.in_features % 4 == 0:
        return "aten._weight_int8pack_mm"
    return "int8 codes scaled back per call, then matmul"


def kernel_summary(kernels: Dict[str, str]) -> str:
    """'kernel (n layers); ...' over the quantized layers, most used first."""
    return "; ".join(f"quanto {kernel} ({n} layers)" for kernel, n in Counter(kernels.values()).most_common())


def save(model: nn.Module, directory: str, layers: Dict[str, dict]) -> str:
    """The model's state (quanto writes frozen weights in its kernel-agnostic packed form) and, per
    quantized module, its quanto type and group size, which quanto's own quantization map lacks."""
    return save_quantized_state(model, directory, MANIFEST, layers)


def load_into(model: nn.Module, directory: str, device: Optional[str] = None) -> nn.Module:
    """Rebuild a saved quanto model on an unquantized copy of its architecture; quanto moves each
    loaded weight onto the kernel it picks for this device."""
    device = device or str(next(model.parameters()).device)
    for name, entry in read_manifest(directory, MANIFEST).items():
        model.set_submodule(name, _qlinear(model.get_submodule(name), entry["qtype"], entry["group_size"]))
    load_quantized_state(model, directory, device)
    return model
