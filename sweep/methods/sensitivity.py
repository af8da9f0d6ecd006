"""Sensitivity: not a quantizer but a measurement: the perplexity increase when each layer group
alone is round-to-nearest quantized at `bits`/`group_size`/`sym` (sweep/measure/sensitivity.py).

The model is left unquantized; the per-group table is the run's `sensitivity.json` artifact
(one run for all groups, not one run per group: see docs/mixed-precision.md for the measurement
behind that choice) and one `sensitivity.<group>.delta_ppl` metric per group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from sweep.measure.probe import probe_tokens
from sweep.methods.base import UNQUANTIZED, QuantMethod, QuantReport
from sweep.measure.artifacts import SENSITIVITY_ARTIFACT
from sweep.measure.sensitivity import measure_sensitivity, table_metrics


@dataclass
class SensitivityOptions:
    # WikiText-2 test articles of the probe; eval=quick scores articles 0 and 1, so the default avoids them.
    probe_docs: List[int] = field(default_factory=lambda: [2, 3])
    probe_tokens: int = 512
    probe_seqlen: int = 512


class Sensitivity(QuantMethod):
    name = "sensitivity"
    compared_with_baseline = False   # it leaves the model unquantized: nothing to compare
    ragged_groups = True  # torch RTN: a ragged last group gets its own scale
    knobs = frozenset({"bits", "group_size", "sym", "quantize_lm_head"})
    Options = SensitivityOptions

    @classmethod
    def check_options(cls, cfg, options: SensitivityOptions) -> List[str]:
        errors = []
        if options.probe_tokens < 16:
            errors.append(f"method.probe_tokens={options.probe_tokens!r} is not allowed: at least 16")
        if options.probe_seqlen < 16:
            errors.append(f"method.probe_seqlen={options.probe_seqlen!r} is not allowed: at least 16")
        if not options.probe_docs or any(not 0 <= d < 62 for d in options.probe_docs):
            errors.append(f"method.probe_docs={options.probe_docs!r} is not allowed: WikiText-2 test articles 0..61")
        return errors

    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        tokens = probe_tokens(self.tokenizer, opts.probe_docs, opts.probe_tokens)
        table = measure_sensitivity(model, tokens, opts.probe_seqlen, cfg.bits, cfg.group_size, cfg.sym,
                                    cfg.quantize_lm_head, progress)
        table["probe_docs"] = list(opts.probe_docs)
        return QuantReport(backend="sweep-torch", weights=UNQUANTIZED, metrics=table_metrics(table),
                           artifacts={SENSITIVITY_ARTIFACT: table})
