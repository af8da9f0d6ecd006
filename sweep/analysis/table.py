"""The summary table of a set of runs read back from the MLflow store: one row per grid point.

Columns in COLUMNS order (stable, documented in docs/report.md). CSV and Parquet keep full
precision; the Markdown, the HTML page (sweep/analysis/html.py) and the terminal table round.
Deltas are against the fp16 baseline of the same sweep, or else the newest finished baseline in
the experiment with the same model and evaluation settings (BASELINE_MATCH).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from sweep.tracking.tracker import TAG_CONFIG_HASH, Tracker

# column → (source, key): where each column comes from in an MLflow run.
COLUMNS: Dict[str, tuple] = {
    "run": ("info", "run_name"),
    "status": ("info", "status"),
    "method": ("tag", "method"),
    "backend": ("tag", "backend"),
    "weights": ("tag", "weights"),
    "bits": ("tag", "bits"),
    "group_size": ("tag", "group_size"),
    "layer_bits": ("tag", "layer_bits"),          # uniform, or mixed (method.layer_bits)
    "avg_bits": ("metric", "quant.bits_per_weight"),  # effective bits per weight, scale/zero overhead included
    "sym": ("param", "sym"),
    "damp_percent": ("param", "damp_percent"),
    "desc_act": ("param", "desc_act"),
    "wikitext_word_ppl": ("metric", "wikitext.word_perplexity"),
    "wikitext_byte_ppl": ("metric", "wikitext.byte_perplexity"),
    "wikitext_bits_per_byte": ("metric", "wikitext.bits_per_byte"),
    "lambada_ppl": ("metric", "lambada.perplexity"),
    "lambada_acc": ("metric", "lambada.acc"),
    "weight_mb": ("metric", "memory.packed_weights_mb"),
    "in_memory_mb": ("metric", "memory.weights_mb"),
    "peak_mb": ("metric", "memory.peak_mb"),
    "quantize_s": ("metric", "time.quantize_s"),
    "tokens_per_s": ("metric", "latency.tokens_per_s"),
    "ttft_ms": ("metric", "latency.ttft_ms_p50"),
    # GPU runs (issue 4): the kernel that runs packed weights, compiled static-cache decode, and the
    # fraction of the memory-bandwidth bound it reaches; model_init=random rows have no quality numbers.
    "kernel": ("tag", "kernel"),
    "static_tokens_per_s": ("metric", "latency.static.tokens_per_s"),
    "static_bandwidth_fraction": ("metric", "latency.static.bandwidth_fraction"),
    "graph_tokens_per_s": ("metric", "latency.graph.tokens_per_s"),
    "graph_bandwidth_fraction": ("metric", "latency.graph.bandwidth_fraction"),
    "model_init": ("tag", "model.init"),
}
QUALITY_COLUMNS = ["wikitext_word_ppl", "wikitext_byte_ppl", "wikitext_bits_per_byte", "lambada_ppl", "lambada_acc"]
DELTAS = {  # delta column → (column, baseline column)
    "delta_word_ppl": "wikitext_word_ppl",
    "delta_lambada_ppl": "lambada_ppl",
    "delta_lambada_acc": "lambada_acc",
    "delta_weight_mb": "weight_mb",
}
TRAILING = ["config_hash", "run_id"]
# Settings that must match for a baseline from outside the sweep to be comparable.
BASELINE_MATCH = ["model.path", "model.num_layers", "model.dtype", "eval.limit.wikitext", "eval.limit.lambada",
                  "eval.max_length", "device"]
SORT = ["method", "bits", "group_size", "damp_percent"]


def _value(run, source: str, key: str):
    if source == "info":
        return getattr(run.info, key)
    if source == "tag":
        return run.data.tags.get(key)
    if source == "param":
        return run.data.params.get(key)
    return run.data.metrics.get(key, math.nan)


def build_table(runs: Sequence, baseline=None) -> pd.DataFrame:
    rows = []
    for run in runs:
        row = {col: _value(run, *src) for col, src in COLUMNS.items()}
        row["config_hash"] = run.data.tags.get(TAG_CONFIG_HASH)
        row["run_id"] = run.info.run_id
        rows.append(row)
    columns = list(COLUMNS) + list(DELTAS) + TRAILING
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    for col in ("bits", "group_size", "damp_percent"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # Integers with blanks (fp16 has no bits), the same type whether or not a sweep has a baseline.
    df[["bits", "group_size"]] = df[["bits", "group_size"]].astype("Int64")
    for col in ("sym", "desc_act"):
        df[col] = df[col].map({"True": True, "False": False}).astype("object")
    # Knobs a method ignores are blank, not misleading (a baseline has no damp_percent).
    df.loc[df["method"] != "gptq", ["damp_percent", "desc_act"]] = None
    df.loc[df["weights"] == "unquantized", ["sym"]] = None
    # Random-weight models measure memory and speed only: their quality numbers are noise.
    df.loc[df["model_init"] == "random", QUALITY_COLUMNS] = math.nan
    base = baseline_row(df, baseline)
    for delta, col in DELTAS.items():
        df[delta] = df[col] - base[col] if base is not None else math.nan
    df = df.sort_values(SORT, na_position="first", kind="stable").reset_index(drop=True)
    return df[columns]


def baseline_row(df: pd.DataFrame, baseline=None) -> Optional[pd.Series]:
    """The row deltas are against: the table's own finished fp16 run, else the given baseline run."""
    finished = df[(df["method"] == "fp16") & (df["status"] == "FINISHED")]
    if len(finished):
        return finished.iloc[0]
    if baseline is not None:
        return build_table([baseline]).iloc[0]
    return None


def find_baseline(tracker: Tracker, runs: Sequence):
    """A finished fp16 run elsewhere in the experiment with the same model and eval settings."""
    point = next((r for r in runs if r.info.status == "FINISHED"), None)
    if point is None:
        return None
    candidates = tracker.client.search_runs(
        [tracker.experiment_id], filter_string="tags.method = 'fp16' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200)
    for cand in candidates:
        same = all(cand.data.params.get(k) == point.data.params.get(k) for k in BASELINE_MATCH if k != "device")
        if same and cand.data.tags.get("device") == point.data.tags.get("device"):
            return cand
    return None


def write_table(df: pd.DataFrame, stem: Path) -> List[Path]:
    """CSV and Parquet at full precision, Markdown rounded."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md, parquet = stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".parquet")
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)
    md.write_text(to_markdown(df) + "\n")
    return [csv, md, parquet]


def rounded(df: pd.DataFrame) -> pd.DataFrame:
    """Floats as text for people: 4 decimals for accuracies and bits per byte, else 2; NaN blank."""
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            digits = 4 if col in ("lambada_acc", "delta_lambada_acc", "wikitext_bits_per_byte") else 2
            shown[col] = shown[col].map(lambda v, d=digits: "" if pd.isna(v) else f"{v:.{d}f}")
        elif shown[col].isna().any():
            shown[col] = shown[col].astype(object).where(shown[col].notna(), "")
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    kept = df.drop(columns=["run_id", "config_hash"])
    shown = rounded(kept)
    align = ["right" if pd.api.types.is_numeric_dtype(kept[c]) and not pd.api.types.is_bool_dtype(kept[c]) else "left"
             for c in kept.columns]
    note = ("weights: `packed` = run by a low-bit kernel; `simulated` = quantize-dequantized values in the "
            "original dtype (quality is real, speed and in-memory size are not those of a packed model); "
            "weight_mb = size in the packed format (computed for simulated runs).")
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n\n" + note


def print_table(df: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["method", "weights", "bits", "group_size", "layer_bits", "avg_bits", "wikitext_word_ppl", "lambada_ppl", "lambada_acc",
            "weight_mb", "peak_mb", "quantize_s", "tokens_per_s", "ttft_ms", "delta_word_ppl", "status"]
    table = Table(title=title, show_lines=False)
    for col in cols:
        table.add_column(col, justify="left" if col in ("method", "weights", "status") else "right")
    for _, row in df.iterrows():
        cells = []
        for col in cols:
            v = row[col]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else (f"{v:.3f}" if col == "lambada_acc" else f"{v:.2f}"))
            else:
                cells.append("" if v is None else str(v))
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table to 80 columns
        console = Console(width=200)
    console.print(table)
