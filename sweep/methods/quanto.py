"""optimum-quanto: data-free int2/int4/int8 (or float8) weights, packed, on quanto's own kernels.

bits 2 and 4: asymmetric groups (a scale and a float shift per group; `sym` does not apply) of the run's
`group_size`, stepped down by quanto's rule where it does not divide a layer's in_features; bits 8:
symmetric, one scale per output channel (quanto has no 8-bit groups). `method.weights=float8` makes the
8-bit codes float8_e4m3fn, on CUDA GPUs with FP8 support (capability >= 8.9) only.

The linears become quanto QLinear modules with frozen packed weights (`weights=packed`); the kernel
that runs each one is quanto's choice, named per layer in the `kernel` tag
(sweep/backends/quanto_backend.py). The checkpoint is saved (size on disk) and reloads with
quanto_backend.load_into.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List

import torch

from sweep.backends import available, install_hint
from sweep.backends.checkpoint import scratch_dir
from sweep.backends.fp8_linear import has_fp8_tensor_cores
from sweep.backends.quanto_backend import (OPTIMIZERS, QUANTO_BITS, WEIGHT_TYPES, compiles_under_dynamo, dequantized,
                                           group_size_for, kernel_of, kernel_summary, qtype_name, quanto_version,
                                           quantize_linear, save, storage_bits)
from sweep.methods.base import PACKED, MixedPrecisionOptions, QuantMethod, QuantReport, runs_on_cuda
from sweep.methods.rtn import layer_record
from sweep.quant.layer_bits import KEEP_BITS, parse_layer_bits
from sweep.quant.layers import quantizable_linears

# bench modes that only time a compiled decode (a failing compile fails the run; "both"/"all" record it)
COMPILED_ONLY = ("static", "graph")


@dataclass
class QuantoOptions(MixedPrecisionOptions):
    weights: str = "int"       # int: qint2/qint4/qint8 by bits | float8: float8_e4m3fn codes (bits=8, CUDA >= 8.9)
    optimizer: str = "auto"    # auto: quanto's (absmax at 8 bits, min/max below) | hqq: quanto's HQQ optimizer (2/4 bits)


class Quanto(QuantMethod):
    name = "quanto"
    knobs = frozenset({"bits", "group_size", "quantize_lm_head"})
    Options = QuantoOptions
    supported_bits = frozenset(QUANTO_BITS)
    # A group size that does not divide in_features is stepped down per layer (quanto's rule), not ragged.
    ragged_groups = True

    @classmethod
    def check_options(cls, cfg, options: QuantoOptions) -> List[str]:
        errors = super().check_options(cfg, options)
        parsed, _ = parse_layer_bits(options.layer_bits)
        if options.weights not in WEIGHT_TYPES:
            errors.append(f"method.weights={options.weights!r} is not allowed: int (qint2/qint4/qint8) or float8")
        elif options.weights == "float8":
            if cfg.bits != 8 or any(e.get("bits", 8) not in (8, KEEP_BITS) for e in parsed.values()):
                errors.append("method.weights='float8' needs bits=8 (and 8 or 16 in method.layer_bits): float8 "
                              "codes are 8-bit")
            # device=auto picks CUDA where there is one: ask that GPU
            if not has_fp8_tensor_cores("cuda" if cfg.device == "auto" else cfg.device):
                errors.append("method.weights='float8' is not allowed on this device: quanto's float8 weights are "
                              "offered on CUDA GPUs with FP8 support (capability >= 8.9); on CPU use method=fp8 "
                              "(simulated FP8) or method.weights=int")
        if options.optimizer not in OPTIMIZERS:
            errors.append(f"method.optimizer={options.optimizer!r} is not allowed: {', '.join(OPTIMIZERS)}")
        if not available("optimum.quanto"):
            errors.append(f"method=quanto needs optimum-quanto, which is not installed: {install_hint('optimum.quanto')}")
        elif cfg.bench.mode in COMPILED_ONLY and runs_on_cuda(cfg.device) and not compiles_under_dynamo():
            errors.append(f"bench.mode={cfg.bench.mode!r} is not allowed with method=quanto on CUDA: optimum-quanto "
                          f"{quanto_version()}'s packed weights do not compile under torch.compile (on the H200 dynamo "
                          "and inductor failed on its int4 and float8 weight tensors), so the run would quantize and "
                          "then fail; use bench.mode=eager, or both / all (eager is timed, a compiled mode's error is "
                          "kept in a latency.<mode>.error tag)")
        return errors

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        opts = self.options
        device = str(next(model.parameters()).device)
        linears = quantizable_linears(model, include_lm_head=self.cfg.quantize_lm_head)
        plan = self.layer_plan(linears)
        report = QuantReport(backend="optimum-quanto", weights=PACKED)
        kernels, manifest, stepped = {}, {}, []
        for name, linear in progress.track(linears.items(), "quanto", total=len(linears)):
            setting = plan[name]
            if not setting.quantized:
                report.layers[name] = layer_record(linear, setting.bits, setting.group_size, 0.0)
                continue
            group_size = group_size_for(linear.in_features, setting.bits, setting.group_size)
            if setting.bits < 8 and group_size != setting.group_size:
                stepped.append((linear.in_features, group_size))
            qtype = qtype_name(setting.bits, opts.weights)
            original = linear.weight.data
            module = quantize_linear(linear, qtype, group_size, opts.optimizer)
            record = report.layers[name] = layer_record(module, setting.bits, group_size, float(
                ((original.float() - dequantized(module).float()) ** 2).sum()))
            record["storage_bits"] = storage_bits(module)
            model.set_submodule(name, module)
            kernels[name] = kernel_of(module, device)
            manifest[name] = {"qtype": qtype, "group_size": group_size}
        if self.workdir:  # the run attaches one; a bare quantize() call (tests) saves nothing
            report.saved_dir = save(model, scratch_dir(self.workdir, "packed"), manifest)
        report.kernel = kernel_summary(kernels)
        for (in_features, size), count in sorted(Counter(stepped).items()):
            report.notes.append(f"group_size={self.cfg.group_size} does not divide in_features {in_features}: quanto's "
                                f"rule (32 less at a time) gave those {count} layers "
                                + (f"groups of {size}" if size != -1 else "one scale per output channel"))
        if self.cfg.bits == 8 and self.cfg.group_size != -1:
            report.notes.append("quanto's 8-bit weights have one scale per output channel: group_size does not apply")
        return report
