"""The unquantized baseline: the model as loaded (fp16 on GPU, fp32 on CPU; the dtype is a tag)."""
from __future__ import annotations

from sweep.methods.base import UNQUANTIZED, QuantMethod, QuantReport


class Baseline(QuantMethod):
    name = "fp16"

    def quantize(self, model, calibration, progress) -> QuantReport:
        return QuantReport(backend="none", weights=UNQUANTIZED, notes=[f"weights kept in {model.dtype}"])
