"""FP8 (e4m3) weights with per-channel or per-group float32 scales, as Hopper deployments run them.

`method.activations=none` is weight-only W8A16; `dynamic` is W8A8 with FP8 activations quantized
per token on the fly (torch._scaled_mm). No calibration data: scales come from the weights' maxima.

Packed only where the tensor cores multiply FP8 (CUDA capability >= 8.9, e.g. the H200): each linear
becomes an Fp8WeightOnlyLinear / Fp8DynamicLinear holding 1-byte codes (sweep/backends/fp8_linear.py).
Everywhere else (CPUs, older GPUs) the same arithmetic is simulated: weights quantize-dequantized
through float8_e4m3fn into the model's dtype and, for W8A8, each linear's input likewise per token,
tagged `weights=simulated`. bits must be 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from sweep.backends.fp8_linear import KERNELS, has_fp8_tensor_cores, pack_linear
from sweep.methods.base import PACKED, SIMULATED, MixedPrecisionOptions, QuantMethod, QuantReport
from sweep.methods.rtn import layer_record
from sweep.quant.fp8 import qdq_per_token, qdq_weight, storage_bits
from sweep.quant.layer_bits import parse_layer_bits
from sweep.quant.layers import quantizable_linears

FP8_BITS = (8,)
ACTIVATIONS = tuple(KERNELS)   # none (W8A16) | dynamic (W8A8)


@dataclass
class Fp8Options(MixedPrecisionOptions):
    activations: str = "none"   # none: W8A16 (weight-only) | dynamic: W8A8, per-token FP8 activations


class Fp8(QuantMethod):
    name = "fp8"
    knobs = frozenset({"bits", "group_size", "quantize_lm_head"})
    Options = Fp8Options
    supported_bits = frozenset(FP8_BITS)   # float8_e4m3fn is an 8-bit format
    ragged_groups = True                   # a ragged last group gets its own scale, as in RTN

    @classmethod
    def check_options(cls, cfg, options: Fp8Options) -> List[str]:
        errors = super().check_options(cfg, options)
        if options.activations not in ACTIVATIONS:
            errors.append(f"method.activations={options.activations!r} is not allowed: none (W8A16, weight-only) "
                          "or dynamic (W8A8, per-token FP8 activations)")
        parsed, _ = parse_layer_bits(options.layer_bits)
        if options.activations == "dynamic":
            sizes = [cfg.group_size] + [e["group_size"] for e in parsed.values() if "group_size" in e]
            if any(size != -1 for size in sizes):
                errors.append(f"group_size={cfg.group_size!r} is not allowed with method.activations='dynamic': W8A8 "
                              "runs torch._scaled_mm with one scale per weight row, so it needs group_size=-1 "
                              "(per channel; also in method.layer_bits)")
        return errors

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        opts = self.options
        device = str(next(model.parameters()).device)
        packed = has_fp8_tensor_cores(device)
        linears = quantizable_linears(model, include_lm_head=self.cfg.quantize_lm_head)
        plan = self.layer_plan(linears)
        kinds = set()
        report = QuantReport(backend="sweep-torch-fp8", weights=PACKED if packed else SIMULATED)
        for name, linear in progress.track(linears.items(), "fp8", total=len(linears)):
            setting = plan[name]
            record = layer_record(linear, setting.bits, setting.group_size, 0.0)
            report.layers[name] = record
            if not setting.quantized:
                continue
            original = linear.weight.data
            if packed:
                module = pack_linear(linear, setting.group_size, opts.activations)
                approximation = module.dequantized_weight(original.dtype)
                model.set_submodule(name, module)
                kinds.add(type(module).__name__)
            else:
                approximation = qdq_weight(original, setting.group_size)
                if opts.activations == "dynamic":
                    linear.register_forward_pre_hook(_fp8_inputs)
            record["error"] = float(((original.float() - approximation.float()) ** 2).sum())
            record["storage_bits"] = storage_bits(linear.in_features, setting.group_size)
            if not packed:
                linear.weight.data.copy_(approximation)
        mode = "W8A8 (dynamic per-token FP8 activations)" if opts.activations == "dynamic" else "W8A16 (weight-only)"
        if packed:
            report.kernel = f"{KERNELS[opts.activations][1]} ({', '.join(sorted(kinds))})"
            report.notes.append(f"{mode}: packed float8_e4m3fn on {torch.cuda.get_device_name(torch.device(device))}")
        else:
            report.notes.append(f"{mode} simulated: {device} has no FP8 tensor cores (CUDA capability >= 8.9), "
                                f"so weights{' and activations' if opts.activations == 'dynamic' else ''} are "
                                f"quantize-dequantized through float8_e4m3fn into {model.dtype}")
        return report


def _fp8_inputs(module, args):
    """Forward pre-hook: the linear's input as W8A8 would see it (per-token FP8 quantize-dequantize)."""
    return (qdq_per_token(args[0]),) + tuple(args[1:])
