"""Round-to-nearest: each weight group snapped to its own min/max grid, no calibration data."""
from __future__ import annotations

import torch

from sweep.methods.base import SIMULATED, MixedPrecisionOptions, QuantMethod, QuantReport
from sweep.quant.grid import qdq_rtn
from sweep.quant.layers import quantizable_linears


class RoundToNearest(QuantMethod):
    name = "rtn"
    knobs = frozenset({"bits", "group_size", "sym", "quantize_lm_head"})
    ragged_groups = True  # the torch grid gives a ragged last group its own scale
    Options = MixedPrecisionOptions

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg = self.cfg
        report = QuantReport(backend="sweep-torch", weights=SIMULATED)
        linears = quantizable_linears(model, include_lm_head=cfg.quantize_lm_head)
        plan = self.layer_plan(linears)
        for name, linear in progress.track(linears.items(), "rtn", total=len(linears)):
            setting = plan[name]
            if not setting.quantized:
                report.layers[name] = layer_record(linear, setting.bits, setting.group_size, 0.0)
                continue
            w = linear.weight.data
            q = qdq_rtn(w, setting.bits, setting.group_size, cfg.sym)
            report.layers[name] = layer_record(linear, setting.bits, setting.group_size,
                                               float(((w.float() - q.float()) ** 2).sum()))
            linear.weight.data.copy_(q)
        return report


def layer_record(linear: torch.nn.Linear, bits: int, group_size: int, error: float) -> dict:
    """One module of QuantReport.layers (bits = KEEP_BITS for a module a mixed plan left unquantized)."""
    return {"bits": bits, "group_size": group_size, "in_features": linear.in_features,
            "out_features": linear.out_features, "error": error}


def planned_layers(model: torch.nn.Module, bits: int, group_size: int, include_lm_head: bool) -> dict:
    """Layer records for a library backend, written before it quantizes (its error is not reported: NaN)."""
    return {name: layer_record(linear, bits, group_size, float("nan"))
            for name, linear in quantizable_linears(model, include_lm_head=include_lm_head).items()}
