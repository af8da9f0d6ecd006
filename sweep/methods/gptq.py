"""GPTQ: second-order, error-compensating quantization from calibration activations.

Backend `torch` (the default on CPU) is this project's own implementation
(sweep/quant/gptq_solver.py): block by block through the model, each decoder layer sees the
outputs of the already-quantized layers before it (sequential), and within a layer the linears
are solved in execution order (true-sequential: q/k/v, then o, then gate/up, then down).
The result is quantize-dequantized weights (`weights=simulated`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from sweep.methods.base import SIMULATED, MixedPrecisionOptions, QuantMethod, QuantReport
from sweep.methods.rtn import layer_record
from sweep.quant.gptq_solver import HessianAccumulator, gptq_quantize
from sweep.quant.layers import (
    capture_first_layer_inputs,
    decoder_layers,
    quantizable_linears,
    run_layer,
    sequential_groups,
)

BACKENDS = ("torch",)


@dataclass
class GPTQOptions(MixedPrecisionOptions):
    backend: str = "torch"
    block_size: int = 128
    true_sequential: bool = True
    static_groups: bool = False


class GPTQ(QuantMethod):
    name = "gptq"
    knobs = frozenset({"bits", "group_size", "sym", "damp_percent", "desc_act", "quantize_lm_head"})
    needs_calibration = True
    Options = GPTQOptions

    @classmethod
    def check_options(cls, cfg, options: GPTQOptions) -> List[str]:
        errors = super().check_options(cfg, options)
        if options.backend not in BACKENDS:
            errors.append(f"method.backend={options.backend!r} is not allowed: backends are {', '.join(BACKENDS)}")
        if options.block_size < 1:
            errors.append(f"method.block_size={options.block_size!r} is not allowed: at least 1")
        return errors

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        report = QuantReport(backend="sweep-torch", weights=SIMULATED)
        all_linears = quantizable_linears(model, include_lm_head=cfg.quantize_lm_head)
        self.plan = self.layer_plan(all_linears)
        inputs = capture_first_layer_inputs(model, calibration)
        layers = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        for index in progress.track(range(len(layers)), "gptq layers", total=len(layers)):
            layer = layers[index]
            linears = {n[len(f"{prefix}.{index}."):]: m for n, m in all_linears.items()
                       if n.startswith(f"{prefix}.{index}.")}
            groups = sequential_groups(layer, inputs, linears) if opts.true_sequential else [list(linears)]
            for group in groups:
                hessians = {n: HessianAccumulator(linears[n].in_features, linears[n].weight.device) for n in group}
                handles = [linears[n].register_forward_pre_hook(
                    lambda mod, args, n=n: hessians[n].add(args[0])) for n in group]
                try:
                    run_layer(layer, inputs)
                finally:
                    for h in handles:
                        h.remove()
                for n in group:
                    self._solve(linears[n], hessians[n].H, f"{prefix}.{index}.{n}", report)
                del hessians
            # The next layer calibrates on what this quantized layer really outputs.
            inputs.hidden = run_layer(layer, inputs)
        if "lm_head" in all_linears:
            self._quantize_lm_head(model, inputs, all_linears["lm_head"], report)
        return report

    def _solve(self, linear, H, full_name, report) -> None:
        cfg, opts = self.cfg, self.options
        setting = self.plan[full_name]
        if not setting.quantized:
            report.layers[full_name] = layer_record(linear, setting.bits, setting.group_size, 0.0)
            return
        result = gptq_quantize(linear.weight.data, H, setting.bits, setting.group_size, cfg.sym, cfg.damp_percent,
                               act_order=cfg.desc_act, static_groups=opts.static_groups, block_size=opts.block_size)
        linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
        report.layers[full_name] = layer_record(linear, setting.bits, setting.group_size, result.loss)
        if result.damp_retries:
            report.notes.append(f"{full_name}: damping raised {result.damp_retries}x to make H positive definite")

    def _quantize_lm_head(self, model, inputs, head, report) -> None:
        norm = getattr(getattr(model, "model", None), "norm", None)
        acc = HessianAccumulator(head.in_features, head.weight.device)
        for hidden in inputs.hidden:
            acc.add(norm(hidden) if norm is not None else hidden)
        self._solve(head, acc.H, "lm_head", report)
