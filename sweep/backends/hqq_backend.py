"""HQQ through the `hqq` package: nn.Linear → hqq's HQQLinear, its checkpoint saved and reloaded.

HQQLinear keeps each weight's codes bit-packed (8-, 4-, 3-, 2- and 1-bit layouts; hqq stores 5- and
6-bit codes one per byte) with a scale and a zero point per group in the model's dtype, and its
PyTorch backend unpacks and dequantizes them on every call before a torch.matmul: on CPU and GPU.
Groups are `group_size` consecutive weights along `axis` of the flattened weight (axis=1: along
a row's input columns, a group crossing into the next row where group_size does not divide
in_features; axis=0: down the output channels), so any group size that divides a layer's number of
weights works.

`kernel=tinygemm_int4` moves 4-bit axis=1 layers onto torch's int4 matmul (`aten._weight_int4pack_mm`,
the same TinyGemmInt4Linear GPTQ's kernel of that name uses): groups of 32/64/128/256 dividing in_features.
The conversion is the project's own, not hqq's patch (hqq.backends.torchao): hqq 0.2.8 reads torch's
version as its first three characters, so on torch 2.10+ ("2.1") it passes int32 codes where the op
now takes uint8 pairs and fails ("Expected in.dtype() == at::kByte", H200, tenth visit).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from sweep.backends.checkpoint import load_quantized_state, read_manifest, save_quantized_state
from sweep.backends.tinygemm import KERNEL as TINYGEMM
from sweep.backends.tinygemm import TinyGemmError, TinyGemmInt4Linear, shape_errors, weight_mismatch

HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)   # hqq's Quantizer.SUPPORTED_BITS, less its ternary 1.58
GROUP_MULTIPLE = 8                 # hqq's quant config asserts group_size % 8 == 0
AXES = (0, 1)
KERNELS = {
    "pytorch": "hqq pytorch: bit-unpack + dequantize per call, then torch.matmul",
    TINYGEMM: "tinygemm_int4: aten._weight_int4pack_mm (hqq codes, scales and zeros repacked)",
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


def tinygemm_int4_errors(bits: int, group_size: int, axis: int, in_features: int, out_features: int) -> List[str]:
    """Why a layer cannot run on tinygemm_int4 (empty: it can): hqq's side, then the kernel's own shape rules."""
    errors = []
    if bits != 4:
        errors.append(f"bits {bits} (4 only)")
    if axis != 1:
        errors.append(f"axis {axis} (1 only)")
    return errors + shape_errors(in_features, group_size, out_features)


def to_tinygemm_int4(module: nn.Module, check: bool = False) -> TinyGemmInt4Linear:
    """The same quantized layer on torch's int4 matmul: hqq's codes, scales and zeros as they are.

    hqq dequantizes w = (code - zero) * scale with a float zero per group; tinygemm's
    (code - 8) * scale + offset is the same with offset = (8 - zero) * scale (TinyGemmInt4Linear
    computes it). `check`: compare the result with hqq's own dequantization, as GPTQ's conversion does
    for its first layer (an identity matmul: too slow to repeat for every layer of a large model)."""
    from hqq.core.quantize import Quantizer

    meta = module.meta
    out_features, in_features = meta["shape"]
    group_size = meta["group_size"] or in_features   # None: one group per row
    problems = tinygemm_int4_errors(meta["nbits"], group_size, meta["axis"], in_features, out_features)
    if meta.get("quant_scale") or meta.get("quant_zero"):
        problems.append("quantized scales or zeros")
    if problems:
        raise TinyGemmError(f"{TINYGEMM} cannot run this hqq layer: {', '.join(problems)}")
    groups = in_features // group_size
    codes = Quantizer.unpack[meta["packing"]](module.W_q)[:out_features * groups].reshape(out_features, in_features)
    scales = meta["scale"].reshape(out_features, groups).t()
    zeros = meta["zero"].reshape(out_features, groups).t()
    fast = TinyGemmInt4Linear(codes, scales, zeros, group_size, bias=module.bias)
    if not check:
        return fast
    mismatch = weight_mismatch(fast, module.dequantize())
    if mismatch:
        raise TinyGemmError(f"{TINYGEMM}: the repacked hqq layer does not reproduce hqq's weights ({mismatch})")
    return fast


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
