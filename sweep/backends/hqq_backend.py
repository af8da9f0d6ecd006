"""HQQ through the `hqq` package: nn.Linear → hqq's HQQLinear, its checkpoint saved and reloaded.

HQQLinear keeps each weight's codes bit-packed (8-, 4-, 3-, 2- and 1-bit layouts; hqq stores 5- and
6-bit codes one per byte) with a scale and a zero point per group in the model's dtype, and its
PyTorch backend unpacks and dequantizes them on every call before a torch.matmul: on CPU and GPU.
Groups are `group_size` consecutive weights along `axis` of the flattened weight (axis=1: along
a row's input columns, a group crossing into the next row where group_size does not divide
in_features; axis=0: down the output channels), so any group size that divides a layer's number of
weights works.

On CUDA, `kernel=torchao_int4` moves 4-bit axis=1 layers onto torch's int4 tinygemm matmul
(`aten._weight_int4pack_mm`) through hqq's own patch (hqq.backends.torchao): bfloat16 only, groups of
32/64/128/256 dividing in_features. Written against hqq 0.2.8 and not yet run on a GPU here.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from sweep.backends.checkpoint import load_quantized_state, read_manifest, save_quantized_state

HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)   # hqq's Quantizer.SUPPORTED_BITS, less its ternary 1.58
GROUP_MULTIPLE = 8                 # hqq's quant config asserts group_size % 8 == 0
AXES = (0, 1)
TORCHAO_INT4 = "torchao_int4"
TORCHAO_GROUP_SIZES = (32, 64, 128, 256)
KERNELS = {
    "pytorch": "hqq pytorch: bit-unpack + dequantize per call, then torch.matmul",
    TORCHAO_INT4: "hqq torchao_int4: aten._weight_int4pack_mm (tinygemm)",
}
MANIFEST = "hqq_layers.json"


@contextlib.contextmanager
def optimizer_settings(lp_norm: float, beta: float, kappa: float, iters: int) -> Iterator[None]:
    """hqq's Quantizer calls its zero-point optimizer with fixed arguments; for the run's settings it
    is swapped for the same function with them bound, and put back afterwards."""
    from hqq.core.optimize import optimize_weights_proximal_legacy
    from hqq.core.quantize import Quantizer

    original = Quantizer.optimize_weights
    Quantizer.optimize_weights = functools.partial(
        optimize_weights_proximal_legacy, opt_params={"lp_norm": lp_norm, "beta": beta, "kappa": kappa, "iters": iters})
    try:
        yield
    finally:
        Quantizer.optimize_weights = original


def quant_config(bits: int, group_size: int, axis: int, optimize: bool) -> dict:
    """hqq's per-layer config. group_size -1 means one group per row (axis=1) or column (axis=0)."""
    from hqq.core.quantize import BaseQuantizeConfig

    config = BaseQuantizeConfig(nbits=bits, group_size=None if group_size == -1 else group_size, axis=axis)
    config["weight_quant_params"]["optimize"] = optimize
    return config


def group_errors(linear: nn.Linear, group_size: int) -> List[str]:
    n = linear.in_features * linear.out_features
    return [] if group_size == -1 or n % group_size == 0 else [f"group_size {group_size} does not divide its {n} weights"]


def quantize_linear(linear: nn.Linear, config: dict, device: str) -> nn.Module:
    from hqq.core.quantize import HQQLinear

    return HQQLinear(linear, config, compute_dtype=linear.weight.dtype, device=device, del_orig=True)


def meta_bytes(module: nn.Module) -> int:
    """Bytes of the scale and zero tensors HQQLinear keeps in its `meta` dict (not parameters)."""
    return sum(t.nelement() * t.element_size() for key, t in module.meta.items()
               if key in ("scale", "zero") and isinstance(t, torch.Tensor))


def storage_bits(module: nn.Module) -> float:
    """Bits per weight HQQLinear holds: packed codes plus its scales and zeros, measured."""
    weights = module.in_features * module.out_features
    code_bytes = module.W_q.nelement() * module.W_q.element_size()
    return (code_bytes + meta_bytes(module)) * 8 / weights


def torchao_int4_errors(bits: int, group_size: int, axis: int, dtype: torch.dtype, in_features: int) -> List[str]:
    """Why a layer cannot run on hqq's torchao_int4 kernel (empty: it can)."""
    errors = []
    if bits != 4:
        errors.append(f"bits {bits} (4 only)")
    if axis != 1:
        errors.append(f"axis {axis} (1 only)")
    if dtype != torch.bfloat16:
        errors.append(f"dtype {dtype} (bfloat16 only)")
    if group_size not in TORCHAO_GROUP_SIZES or in_features % group_size:
        errors.append(f"group_size {group_size} (one of {', '.join(map(str, TORCHAO_GROUP_SIZES))} dividing "
                      f"in_features {in_features})")
    return errors


def to_torchao_int4(module: nn.Module) -> nn.Module:
    """The same quantized layer on torch's int4 tinygemm kernel (hqq's own conversion, CUDA only)."""
    from hqq.backends.torchao import patch_hqq_to_aoint4

    return patch_hqq_to_aoint4(module, None)


def save(model: nn.Module, directory: str, layers: Dict[str, nn.Module]) -> str:
    """The quantized model's state (HQQLinear serializes its packed codes and meta) and which modules
    are HQQ layers, so that `load_into` can rebuild them."""
    return save_quantized_state(model, directory, MANIFEST, sorted(layers))


def load_into(model: nn.Module, directory: str, device: Optional[str] = None) -> nn.Module:
    """Rebuild a saved HQQ model on an unquantized copy of its architecture: each listed linear becomes
    an empty HQQLinear, then every tensor (packed codes, meta, the unquantized rest) is loaded."""
    from hqq.core.quantize import HQQLinear

    device = device or str(next(model.parameters()).device)
    dtype = next(model.parameters()).dtype
    for name in read_manifest(directory, MANIFEST):
        model.set_submodule(name, HQQLinear(None, quant_config=None, compute_dtype=dtype, device=device,
                                            initialize=False))
    load_quantized_state(model, directory, device)
    return model
