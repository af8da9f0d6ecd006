"""What a single run (`python -m sweep` without -m) prints when it ends: its key numbers, and where to look next.

A sweep ends with its summary table (sweep/pipeline/sweeps.py); a single run has no table, so it
prints its own few lines: quality with its 95% interval, the weights' size, decode speed and
quantization time, the deltas against a matching fp16 run when the store has one, then the
commands that show more.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from rich.console import Console
from rich.table import Table

from sweep.analysis.configs import interval_text, number
from sweep.config.schema import SweepConfig
from sweep.pipeline.identity import baseline_config, config_hash
from sweep.tracking.tracker import Tracker
from sweep.tracking.ui import browse_hint

# (label, metric, digits), in the order printed.
KEY_NUMBERS = [
    ("WikiText-2 word perplexity", "wikitext.word_perplexity", 2),
    ("LAMBADA accuracy", "lambada.acc", 4),
    ("LAMBADA perplexity", "lambada.perplexity", 2),
    ("weights, packed format (MB)", "memory.packed_weights_mb", 1),
    ("decode tokens/s", "latency.tokens_per_s", 1),
    ("quantization (s)", "time.quantize_s", 1),
]


def print_point_summary(cfg: SweepConfig, device: str, run_id: str, metrics: Dict[str, float], tracker: Tracker,
                        console: Optional[Console] = None) -> None:
    console = console or Console(stderr=True, highlight=False)
    baseline = None
    if cfg.method_name != "fp16":
        baseline = tracker.find_finished(config_hash(baseline_config(cfg), device))
    table = Table(title=f"run {run_id}", show_lines=False)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    table.add_column("vs fp16" if baseline is not None else "", justify="right")
    for label, name, digits in KEY_NUMBERS:
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            continue
        interval = interval_text(metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high"), digits)
        delta = ""
        if baseline is not None and name in baseline.data.metrics:
            delta = f"{value - baseline.data.metrics[name]:+.{digits}f}"
        table.add_row(label, number(value, digits), interval, delta)
    console.print(table)
    if baseline is None and cfg.method_name != "fp16":
        console.print("  no finished fp16 run with this model, evaluation and device in the store yet: a sweep "
                      "(-m) adds one, or run `python -m sweep method=fp16` with the same settings")
    console.print(f"  report:    python -m sweep.report --experiment {tracker.experiment_name}"
                  + (f" --tracking-uri {tracker.uri}" if cfg.tracking.uri else ""))
    console.print(f"  MLflow UI: {browse_hint(tracker.uri, f'/#/experiments/{tracker.experiment_id}/runs/{run_id}')}")
