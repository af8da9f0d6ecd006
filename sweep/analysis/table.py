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

from sweep.tracking.orphans import owner_gone
from sweep.tracking.tracker import TAG_BASELINE_HASH, TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_SEEDED, TAG_SWEEP_ID, Tracker

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
    "seed": ("param", "seed"),
    "calibration": ("tag", "calibration.source"),          # lambada_dev, self_generated, a file, hub:..., or none
    "calibration_tokens": ("tag", "calibration.tokens"),     # nsamples × seqlen
    "calibration_fingerprint": ("tag", "calibration.fingerprint"),  # hash of the windows themselves
    "wikitext_word_ppl": ("metric", "wikitext.word_perplexity"),
    "wikitext_word_ppl_ci_low": ("metric", "wikitext.word_perplexity_ci_low"),    # 95%, bootstrap over documents
    "wikitext_word_ppl_ci_high": ("metric", "wikitext.word_perplexity_ci_high"),
    "wikitext_byte_ppl": ("metric", "wikitext.byte_perplexity"),
    "wikitext_bits_per_byte": ("metric", "wikitext.bits_per_byte"),
    "lambada_ppl": ("metric", "lambada.perplexity"),
    "lambada_ppl_ci_low": ("metric", "lambada.perplexity_ci_low"),                # 95%, bootstrap over passages
    "lambada_ppl_ci_high": ("metric", "lambada.perplexity_ci_high"),
    "lambada_acc": ("metric", "lambada.acc"),
    "lambada_acc_ci_low": ("metric", "lambada.acc_ci_low"),
    "lambada_acc_ci_high": ("metric", "lambada.acc_ci_high"),
    "weight_mb": ("metric", "memory.packed_weights_mb"),
    "in_memory_mb": ("metric", "memory.weights_mb"),
    "peak_mb": ("metric", "memory.peak_mb"),
    "quantize_s": ("metric", "time.quantize_s"),
    "tokens_per_s": ("metric", "latency.tokens_per_s"),
    "ttft_ms": ("metric", "latency.ttft_ms_p50"),
    "batch_size": ("param", "bench.batch_size"),   # sequences decoded together in the latency runs
    # GPU runs (issue 4): the kernel that runs packed weights, compiled static-cache decode, and the
    # fraction of the memory-bandwidth bound it reaches; model_init=random rows have no quality numbers.
    "kernel": ("tag", "kernel"),
    "static_tokens_per_s": ("metric", "latency.static.tokens_per_s"),
    "static_bandwidth_fraction": ("metric", "latency.static.bandwidth_fraction"),
    "graph_tokens_per_s": ("metric", "latency.graph.tokens_per_s"),
    "graph_bandwidth_fraction": ("metric", "latency.graph.bandwidth_fraction"),
    "model_init": ("tag", "model.init"),
    # Reproducibility: whether every op was deterministic, and a checksum of the quantized weights.
    "deterministic": ("tag", "deterministic"),
    "weights_sha256": ("tag", "weights.sha256"),
    "seeded": ("tag", TAG_SEEDED),
    "config_group": ("tag", TAG_CONFIG_GROUP),
    "baseline_hash": ("tag", TAG_BASELINE_HASH),
}
QUALITY_COLUMNS = ["wikitext_word_ppl", "wikitext_byte_ppl", "wikitext_bits_per_byte", "lambada_ppl", "lambada_acc"]
DELTAS = {  # delta column → (column, baseline column)
    "delta_word_ppl": "wikitext_word_ppl",
    "delta_lambada_ppl": "lambada_ppl",
    "delta_lambada_acc": "lambada_acc",
    "delta_weight_mb": "weight_mb",
}
TRAILING = ["config_hash", "run_id", "reused", "settings"]
# Params that tell apart two configurations with the same method, bits and group size (quanto int8 vs float8
# weights, AutoRound tuned vs RTN mode, a quick vs a full evaluation): the configuration labels name them.
SETTINGS_PREFIXES = ("method.", "eval.limit.")
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


def build_table(runs: Sequence, baseline=None, sweep_id: Optional[str] = None) -> pd.DataFrame:
    """One row per run. `sweep_id`: the sweep the table is for; its `reused` column marks runs that
    finished earlier, outside it (reused instead of re-run)."""
    rows = []
    for run in runs:
        row = {col: _value(run, *src) for col, src in COLUMNS.items()}
        row["config_hash"] = run.data.tags.get(TAG_CONFIG_HASH)
        row["run_id"] = run.info.run_id
        row["reused"] = sweep_id is not None and run.data.tags.get(TAG_SWEEP_ID) != sweep_id
        row["settings"] = settings_text(run.data.params)
        if row["status"] == "RUNNING" and owner_gone(run.data.tags):
            # Killed outright (SIGKILL, a segfault): the store says RUNNING until a relaunch closes it, but its
            # process on this host is gone, so it is read as what it is.
            row["status"] = "KILLED"
        rows.append(row)
    columns = list(COLUMNS) + list(DELTAS) + TRAILING
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    for col in ("bits", "group_size", "damp_percent", "batch_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # Integers with blanks (fp16 has no bits), the same type whether or not a sweep has a baseline.
    df[["bits", "group_size"]] = df[["bits", "group_size"]].astype("Int64")
    for col in ("sym", "desc_act"):
        df[col] = df[col].map({"True": True, "False": False}).astype("object")
    # Knobs a method ignores are blank, not misleading (a baseline has no damp_percent).
    df.loc[df["method"] != "gptq", ["damp_percent", "desc_act"]] = None
    df.loc[df["weights"] == "unquantized", ["sym"]] = None
    # Random-weight models measure memory and speed only: their quality numbers are noise.
    df.loc[df["model_init"] == "random", [c for c in df.columns if c.startswith(tuple(QUALITY_COLUMNS))]] = math.nan
    base = baseline_row(df, baseline)
    for delta, col in DELTAS.items():
        df[delta] = df[col] - base[col] if base is not None else math.nan
    df = df.sort_values(SORT, na_position="first", kind="stable").reset_index(drop=True)
    return df[columns]


def settings_text(params: Dict[str, str]) -> str:
    """The run's method and evaluation-limit params as `key=value; ...`, sorted (method.name left out)."""
    return "; ".join(f"{k}={v}" for k, v in sorted(params.items())
                     if k.startswith(SETTINGS_PREFIXES) and k != "method.name")


def parse_settings(text) -> Dict[str, str]:
    if not isinstance(text, str) or not text:
        return {}
    return dict(item.split("=", 1) for item in text.split("; "))


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


def write_table(df: pd.DataFrame, stem: Path, markdown: Optional[str] = None) -> List[Path]:
    """CSV and Parquet at full precision; Markdown rounded (`markdown`, or the whole table rounded)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md, parquet = stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".parquet")
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)
    md.write_text((to_markdown(df) if markdown is None else markdown) + "\n")
    return [csv, md, parquet]


def rounded(df: pd.DataFrame) -> pd.DataFrame:
    """Floats as text for people: 4 decimals for accuracies and bits per byte, else 2; NaN blank."""
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            digits = 4 if col.startswith(("lambada_acc", "delta_lambada_acc", "wikitext_bits_per_byte", "p_vs")) else 2
            shown[col] = shown[col].map(lambda v, d=digits: "" if pd.isna(v) else f"{v:.{d}f}")
        elif shown[col].isna().any():
            shown[col] = shown[col].astype(object).where(shown[col].notna(), "")
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    kept = df.drop(columns=[c for c in ("run_id", "config_hash", "config_group", "baseline_hash", "weights_sha256")
                            if c in df.columns])
    shown = rounded(kept)
    align = ["right" if pd.api.types.is_numeric_dtype(kept[c]) and not pd.api.types.is_bool_dtype(kept[c]) else "left"
             for c in kept.columns]
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n\n" + WEIGHTS_NOTE


WEIGHTS_NOTE = ("weights: `packed` = run by a low-bit kernel; `simulated` = quantize-dequantized values in the "
                "original dtype (quality is real, speed and in-memory size are not those of a packed model); "
                "weight_mb = size in the packed format (computed for simulated runs).")


def print_table(view: pd.DataFrame, title: str) -> None:
    """A table of text cells (e.g. sweep.analysis.configs.summary_view) in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in view.columns:
        table.add_column(col, justify="left" if view[col].map(lambda v: not _numeric_text(v)).any() else "right")
    for _, row in view.iterrows():
        table.add_row(*["" if v is None else str(v) for v in row])
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table to 80 columns
        console = Console(width=220)
    console.print(table)


def _numeric_text(value) -> bool:
    text = str(value).replace("±", "").replace(" ", "")
    try:
        float(text)
        return True
    except ValueError:
        return text == ""
