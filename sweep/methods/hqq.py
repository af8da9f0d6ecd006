"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization) through the `hqq` package, no calibration data.

Each group's zero point (and scale) is fitted by a half-quadratic solver that minimises an l_p<1 norm
of the weight error, robust to the outliers min/max rounding is hostage to. Always asymmetric (a
float zero per group; `sym` does not apply). bits 1-6 and 8 (hqq has no 7-bit layout).

The quantized layers are hqq's HQQLinear modules holding bit-packed codes (`weights=packed`),
dequantized on each call by hqq's PyTorch backend on CPU and GPU, or moved onto torch's int4
tinygemm kernel where a layer fits (`method.kernel`; by default on CUDA in bfloat16;
sweep/backends/hqq_backend.py), where each attention's q/k/v and each MLP's gate/up then run as one
matmul (`method.fuse_projections`, as for GPTQ: sweep/backends/tinygemm_fusion.py). The packed checkpoint is
saved (size on disk) and can be loaded back with hqq_backend.load_into.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from sweep.backends import available, install_hint
from sweep.backends.hqq_backend import (AXES, GROUP_MULTIPLE, HQQ_BITS, KERNELS, group_errors, meta_bytes,
                                        optimizer_settings, quant_config, quantize_linear, save, storage_bits,
                                        tinygemm_int4_errors, to_tinygemm_int4)
from sweep.backends.checkpoint import scratch_dir
from sweep.backends.tinygemm import GROUP_SIZES as TINYGEMM_GROUP_SIZES
from sweep.backends.tinygemm import KERNEL as TINYGEMM
from sweep.backends.tinygemm_fusion import fuse_projections
from sweep.methods.base import PACKED, MixedPrecisionOptions, QuantMethod, QuantReport
from sweep.methods.rtn import layer_record
from sweep.quant.layer_bits import parse_layer_bits
from sweep.quant.layers import quantizable_linears

KERNEL_CHOICES = ("auto",) + tuple(KERNELS)


@dataclass
class HQQOptions(MixedPrecisionOptions):
    # 1: groups run along a row's input columns (the layout hqq's fast kernels take); 0: down the output
    # channels, which hqq's authors found more accurate at low bits (PyTorch backend only).
    axis: int = 1
    optimize: bool = True      # the half-quadratic zero-point solver; false = min/max rounding in hqq's format
    lp_norm: float = 0.7       # the solver's l_p norm (p < 1: outlier-robust)
    beta: float = 10.0         # its initial penalty
    kappa: float = 1.01        # the penalty's growth per iteration
    iters: int = 20            # its iterations (it stops early once the error grows)
    # auto: tinygemm_int4 on CUDA for bfloat16 models where a layer fits (its scales are bfloat16), else pytorch
    kernel: str = "auto"       # auto | pytorch | tinygemm_int4
    # On tinygemm_int4: q/k/v and gate/up as one int4 matmul each, as GPTQ does (faster batch-1 decode, same outputs)
    fuse_projections: bool = True


class HQQ(QuantMethod):
    name = "hqq"
    knobs = frozenset({"bits", "group_size", "quantize_lm_head"})
    Options = HQQOptions
    supported_bits = frozenset(HQQ_BITS)
    # Groups run over the flattened weight, so a group size that does not divide in_features is fine
    # (a group then spans two rows); it must divide each layer's weight count, checked per layer.
    ragged_groups = True

    @classmethod
    def check_options(cls, cfg, options: HQQOptions) -> List[str]:
        errors = super().check_options(cfg, options)
        parsed, _ = parse_layer_bits(options.layer_bits)
        for field_name, size in [("group_size", cfg.group_size)] + [
                (f"method.layer_bits[{p!r}]: group_size", e["group_size"]) for p, e in parsed.items() if "group_size" in e]:
            if size != -1 and size % GROUP_MULTIPLE:
                errors.append(f"{field_name}={size!r} is not allowed for method hqq: -1 (one group per row) or a "
                              f"multiple of {GROUP_MULTIPLE}")
        if options.axis not in AXES:
            errors.append(f"method.axis={options.axis!r} is not allowed: 1 (groups along input columns) or 0 "
                          "(along output channels)")
        if options.iters < 1:
            errors.append(f"method.iters={options.iters!r} is not allowed: at least 1 solver iteration")
        if not 0 < options.lp_norm <= 1:
            errors.append(f"method.lp_norm={options.lp_norm!r} is not allowed: a norm p in (0, 1]")
        if options.beta <= 0 or options.kappa < 1:
            errors.append(f"method.beta={options.beta!r}, method.kappa={options.kappa!r} are not allowed: beta > 0 "
                          "and kappa >= 1")
        if options.kernel not in KERNEL_CHOICES:
            errors.append(f"method.kernel={options.kernel!r} is not allowed: {', '.join(KERNEL_CHOICES)}")
        elif options.kernel == TINYGEMM and (cfg.bits != 4 or options.axis != 1
                                                   or cfg.group_size not in TINYGEMM_GROUP_SIZES):
            errors.append(f"method.kernel={TINYGEMM!r} needs bits=4, method.axis=1 and group_size one of "
                          f"{', '.join(map(str, TINYGEMM_GROUP_SIZES))}; got bits={cfg.bits}, "
                          f"method.axis={options.axis}, group_size={cfg.group_size}")
        if not available("hqq"):
            errors.append(f"method=hqq needs hqq, which is not installed: {install_hint('hqq')}")
        return errors

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        opts = self.options
        device = str(next(model.parameters()).device)
        linears = quantizable_linears(model, include_lm_head=self.cfg.quantize_lm_head)
        plan = self.layer_plan(linears)
        report = QuantReport(backend="hqq", weights=PACKED)
        quantized = {}
        with optimizer_settings(opts.lp_norm, opts.beta, opts.kappa, opts.iters):
            for name, linear in progress.track(linears.items(), "hqq", total=len(linears)):
                setting = plan[name]
                record = report.layers[name] = layer_record(linear, setting.bits, setting.group_size, 0.0)
                if not setting.quantized:
                    continue
                problems = group_errors(linear, setting.group_size)
                if problems:
                    raise ValueError(f"method=hqq cannot quantize {name}: {'; '.join(problems)}")
                original = linear.weight.data
                module = quantize_linear(linear, quant_config(setting.bits, setting.group_size, opts.axis,
                                                              opts.optimize), device)
                record["error"] = float(((original.float() - module.dequantize().float()) ** 2).sum())
                record["storage_bits"] = storage_bits(module)
                model.set_submodule(name, module)
                quantized[name] = module
        if self.workdir:  # the run attaches one; a bare quantize() call (tests) saves nothing
            report.saved_dir = save(model, scratch_dir(self.workdir, "packed"), quantized)
        on_kernel = {name: self._kernel_for(module, plan[name], device) for name, module in quantized.items()}
        converted = 0
        for name, kernel in on_kernel.items():
            if kernel == TINYGEMM:
                model.set_submodule(name, to_tinygemm_int4(quantized[name], check=converted == 0))
                converted += 1
            else:
                report.unregistered_weight_bytes += meta_bytes(quantized[name])
        report.kernel = "; ".join(f"{KERNELS[k]} ({sum(v == k for v in on_kernel.values())} layers)"
                                  for k in sorted(set(on_kernel.values())))
        if converted and opts.fuse_projections:
            fused = fuse_projections(model)
            report.tags["fused_projections"] = f"q/k/v in {fused['qkv']} attentions, gate/up in {fused['gate_up']} MLPs"
        if any(setting.bits in (5, 6) for setting in plan.values()):
            report.notes.append("hqq stores 5- and 6-bit codes one per byte: quant.bits_per_weight counts 8 bits for them")
        return report

    def _kernel_for(self, module, setting, device: str) -> str:
        """pytorch, or tinygemm_int4 where asked (or auto on CUDA in bfloat16) and the layer fits it."""
        kernel = self.options.kernel
        if kernel == "pytorch" or (kernel == "auto" and not (device.startswith("cuda")
                                                             and module.compute_dtype == torch.bfloat16)):
            return "pytorch"
        problems = tinygemm_int4_errors(setting.bits, setting.group_size, self.options.axis, module.in_features,
                                        module.out_features)
        if problems and kernel == TINYGEMM:
            raise ValueError(f"method.kernel={TINYGEMM!r} cannot run a layer with {', '.join(problems)}")
        return "pytorch" if problems else TINYGEMM
