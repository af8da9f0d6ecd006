"""One row per configuration: the runs that differ only in their seed, aggregated, with intervals and significance.

A configuration is everything that determines a result except the seed (the run tag
`sweep.config_group`). Its row holds, per quality metric: the mean over its finished runs, their
standard deviation, min and max, and a 95% interval that counts both the evaluation noise (a
bootstrap over the items, averaged over seeds item by item) and the seed spread
(sweep/analysis/significance.py). Then the deltas against its fp16 baseline (the run whose
config hash is the row's `sweep.baseline_hash` tag) and two verdicts on the ranking metric:
`vs_best` (against the best configuration) and `vs_fp16` (against the baseline), each `better`,
`worse` or `same`, with the p-value of a paired comparison over the same items.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import pandas as pd

from sweep.analysis.significance import ALPHA, Pooled, compare, estimate, pool
from sweep.analysis.table import WEIGHTS_NOTE, parse_settings
from sweep.measure.uncertainty import METRICS, MIN_ITEMS

# Report column → run metric, for the metrics that get mean/std/min/max/interval per configuration.
QUALITY = {
    "wikitext_word_ppl": "wikitext.word_perplexity",
    "wikitext_byte_ppl": "wikitext.byte_perplexity",
    "wikitext_bits_per_byte": "wikitext.bits_per_byte",
    "lambada_ppl": "lambada.perplexity",
    "lambada_acc": "lambada.acc",
}
STATS = ("std", "min", "max", "ci_low", "ci_high")
# The ranking metric of vs_best / vs_fp16, in order of preference: the first one scored on enough items.
RANKING = ["wikitext_word_ppl", "lambada_ppl"]
IDENTITY = ["method", "backend", "weights", "kernel", "bits", "group_size", "layer_bits", "avg_bits", "sym",
            "damp_percent", "desc_act", "calibration", "calibration_tokens", "model_init", "batch_size"]
COSTS = ["weight_mb", "in_memory_mb", "peak_mb", "quantize_s", "tokens_per_s", "ttft_ms", "static_tokens_per_s",
         "static_bandwidth_fraction", "graph_tokens_per_s", "graph_bandwidth_fraction"]
DELTAS = {"delta_word_ppl": "wikitext_word_ppl", "delta_lambada_ppl": "lambada_ppl",
          "delta_lambada_acc": "lambada_acc", "delta_weight_mb": "weight_mb"}
VERDICTS = ["ranking_metric", "vs_best", "p_vs_best", "vs_fp16", "p_vs_fp16"]


def config_columns() -> List[str]:
    quality = [c for col in QUALITY for c in (col, *(f"{col}_{s}" for s in STATS))]
    return (["config", "runs", "seeds", "failed", "running", "deterministic", "baseline", *IDENTITY, *quality, *COSTS,
             *DELTAS, *VERDICTS, "config_group", "baseline_hash", "run_ids"])


def _label(first: pd.Series, calibrations: int) -> str:
    if pd.isna(first["bits"]):
        return str(first["method"])
    group = "ch" if first["group_size"] == -1 else f"g{int(first['group_size'])}"
    label = f"{first['method']} {int(first['bits'])}b {group}"
    # Several calibrations in one table (a calibration study): say which one each row is.
    if calibrations > 1 and first.get("calibration") not in (None, "none") and not pd.isna(first.get("calibration")):
        label += f" {first['calibration']}×{int(float(first['calibration_tokens']))}"
    return label


def _tell_apart(df: pd.DataFrame) -> None:
    """Configurations that share a label get the settings in which they differ appended to it
    (`quanto 8b g64 weights=float8` beside `weights=int`), so no two rows of a table read the same."""
    for label, part in df.groupby("config"):
        if len(part) < 2:
            continue
        settings = {i: parse_settings(text) for i, text in part["_settings"].items()}
        keys = sorted({k for s in settings.values() for k in s})
        differing = [k for k in keys if len({s.get(k) for s in settings.values()}) > 1]
        for i, s in settings.items():
            # A missing eval.limit is no limit (every item); a missing method param, one that method lacks.
            extra = " ".join(f"{k.removeprefix('method.')}={s.get(k, 'all' if k.startswith('eval.') else '-')}"
                             for k in differing)
            if extra:
                df.loc[i, "config"] = f"{label} {extra}"


def build_configurations(runs: pd.DataFrame, items: Dict[str, Optional[dict]]) -> pd.DataFrame:
    """Aggregate the per-run table (sweep/analysis/table.py) by configuration.

    `items` maps run ids to their per-item evaluation results (eval_items.json), None where a run
    has none; those runs still count in mean/std, but no interval or verdict rests on them.
    """
    columns = config_columns()
    if runs.empty:
        return pd.DataFrame(columns=columns)
    key = runs["config_group"].fillna(runs["config_hash"]).fillna(runs["run_id"])
    calibrations = runs.loc[runs["calibration"].notna() & (runs["calibration"] != "none"),
                            ["calibration", "calibration_tokens"]].drop_duplicates().shape[0]
    rows, pooled = [], {}
    for group, part in runs.groupby(key, sort=False):
        finished = part[part["status"] == "FINISHED"]
        first = (finished if len(finished) else part).iloc[0]
        row = {col: first.get(col) for col in IDENTITY}
        # A run still RUNNING (a sweep in progress, or one killed before a relaunch looked at it) has not failed.
        running = int((part["status"] == "RUNNING").sum())
        row.update(config=_label(first, calibrations), runs=len(finished), running=running,
                   failed=int(len(part) - len(finished) - running),
                   seeds=",".join(sorted({str(s) for s in finished["seed"].dropna()},
                                         key=lambda s: (len(s), s))),   # numeric order for integer seeds
                   deterministic=_all_true(finished["deterministic"]), config_group=group,
                   baseline_hash=first.get("baseline_hash"), run_ids=",".join(finished["run_id"]),
                   baseline=_baseline_note(finished, running) if first["method"] == "fp16" else "")
        seeded = str(first.get("seeded")).lower() != "false"
        run_items = [items.get(r) for r in finished["run_id"]]
        for col, name in QUALITY.items():
            values = finished[col].astype(float).dropna()
            row[col] = float(values.mean()) if len(values) else math.nan
            row[f"{col}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{col}_min"] = float(values.min()) if len(values) else math.nan
            row[f"{col}_max"] = float(values.max()) if len(values) else math.nan
            row[f"{col}_ci_low"] = row[f"{col}_ci_high"] = math.nan
            p = pool(METRICS[name], run_items, seeded=seeded) if len(finished) and all(run_items) else None
            est = estimate(p) if p is not None else None
            if est is not None:
                row[f"{col}_ci_low"], row[f"{col}_ci_high"] = est.ci_low, est.ci_high
            pooled[(group, col)] = p
        for col in COSTS:
            values = pd.to_numeric(finished[col], errors="coerce").dropna() if col in finished else pd.Series([])
            row[col] = float(values.mean()) if len(values) else math.nan
        row["_settings"] = first.get("settings")
        rows.append(row)
    df = pd.DataFrame(rows)
    _tell_apart(df)
    df[["bits", "group_size"]] = df[["bits", "group_size"]].apply(pd.to_numeric, errors="coerce").astype("Int64")
    # Random-weight models measure memory and speed only: their quality numbers are noise.
    quality_cols = [c for col in QUALITY for c in (col, *(f"{col}_{s}" for s in STATS))]
    df.loc[df["model_init"] == "random", quality_cols] = math.nan
    _add_deltas(df)
    _add_verdicts(df, pooled)
    return df[columns]


def _all_true(values: pd.Series) -> Optional[bool]:
    flags = [str(v).lower() for v in values.dropna()]
    if not flags:
        return None
    return all(f == "true" for f in flags)


def _baseline_note(finished: pd.DataFrame, running: int) -> str:
    if not len(finished):
        return "baseline, running" if running else "baseline, failed"
    reused = finished["reused"].fillna(False).astype(bool) if "reused" in finished else pd.Series([False])
    if reused.all():
        return f"baseline, reused run {finished['run_id'].iloc[0][:8]}"
    return "baseline, ran in this sweep"


def baseline_rows(df: pd.DataFrame) -> Dict[str, int]:
    """config_group of each baseline (fp16) configuration → its row index."""
    return {g: i for i, g in df.loc[df["method"] == "fp16", "config_group"].items() if df.loc[i, "runs"] > 0}


def baseline_of(df: pd.DataFrame, index) -> Optional[int]:
    """The row index of row `index`'s fp16 baseline: the one its runs name (`sweep.baseline_hash`); for runs
    from before that tag, the table's only baseline, if it has exactly one."""
    baselines = baseline_rows(df)
    named = df.loc[index, "baseline_hash"]
    if isinstance(named, str) and named:
        return baselines.get(named)
    return next(iter(baselines.values())) if len(baselines) == 1 else None


def _add_deltas(df: pd.DataFrame) -> None:
    for delta in DELTAS:
        df[delta] = math.nan
    for i, row in df.iterrows():
        base = i if row["method"] == "fp16" else baseline_of(df, i)
        if base is None:
            continue
        for delta, col in DELTAS.items():
            df.loc[i, delta] = row[col] - df.loc[base, col]


def ranking_column(df: pd.DataFrame, pooled: Dict) -> Optional[str]:
    """The first metric of RANKING that the configurations were scored on with enough items to test
    a difference (eval=quick scores 2 WikiText articles, too few: it ranks by LAMBADA's 200 passages)."""
    for col in RANKING:
        sizes = [len(p.num) for (_, c), p in pooled.items() if c == col and p is not None]
        if sizes and max(sizes) >= MIN_ITEMS:
            return col
    return next((c for c in RANKING if df[c].notna().any()), None)


def _add_verdicts(df: pd.DataFrame, pooled: Dict) -> None:
    for col in VERDICTS:
        df[col] = None
    col = ranking_column(df, pooled)
    if col is None:
        return
    metric = METRICS[QUALITY[col]]
    df["ranking_metric"] = col
    scored = df[df[col].notna() & (df["runs"] > 0)]
    if scored.empty:
        return
    best_index = scored[col].idxmin() if metric.lower_is_better else scored[col].idxmax()
    best = pooled.get((df.loc[best_index, "config_group"], col))
    for i, row in scored.iterrows():
        mine = pooled.get((row["config_group"], col))
        if i == best_index:
            df.loc[i, "vs_best"] = "best"
        else:
            df.loc[i, ["vs_best", "p_vs_best"]] = _verdict(mine, best, metric.lower_is_better)
        base = baseline_of(df, i)
        if row["method"] == "fp16":
            df.loc[i, "vs_fp16"] = "baseline"
        elif base is not None:
            df.loc[i, ["vs_fp16", "p_vs_fp16"]] = _verdict(mine, pooled.get((df.loc[base, "config_group"], col)),
                                                           metric.lower_is_better)


def _verdict(a: Optional[Pooled], b: Optional[Pooled], lower_is_better: bool):
    if a is None or b is None:
        return ["untested (no per-item results)", None]
    comparison = compare(a, b)
    if comparison is None:
        if a.doc_ids != b.doc_ids:
            return ["untested (different items)", None]
        return [f"untested (only {len(a.num)} items)", None]
    return [comparison.verdict(lower_is_better, ALPHA), comparison.p]


def number(value: float, digits: int) -> str:
    """Fixed decimals for people; 4 significant digits for the huge perplexities of broken models."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.{digits}f}"


def mean_pm_std(mean: float, std: float, digits: int) -> str:
    if not number(mean, digits):
        return ""
    if not number(std, digits):
        return number(mean, digits)
    return f"{number(mean, digits)} ± {number(std, digits)}"


def interval_text(low: float, high: float, digits: int) -> str:
    if not number(low, digits) or not number(high, digits):
        return ""
    return f"[{number(low, digits)}, {number(high, digits)}]"



# The summary as people read it (Markdown, HTML, terminal): text cells, mean ± std and the interval.
NOTES = ("Each row is one configuration: its runs differ only in the seed (runs, seeds). Quality is the mean "
         "over those runs ± their standard deviation; `95% CI` counts the evaluation noise (a bootstrap over "
         "documents / passages) and the seed spread. `vs_best` and `vs_fp16` compare the ranking metric with the "
         "best configuration and with the fp16 baseline, paired over the same items (docs/report.md): `same` "
         "means the difference is within the noise (p ≥ 0.05); `eval only` marks a calibrated configuration run "
         "with one seed, whose seed noise is unknown. deterministic=False: an op without a deterministic "
         "implementation ran (the run's tag deterministic.ops names it).")


def _runs_cell(finished: int, seeds, failed: int, running: int) -> str:
    cell = f"{finished} (seeds {seeds})" if isinstance(seeds, str) and "," in seeds else str(finished)
    others = [f"{n} {what}" for n, what in ((failed, "failed"), (running, "running")) if n]
    return f"{cell}, {', '.join(others)}" if others else cell


def summary_view(df: pd.DataFrame) -> pd.DataFrame:
    """The configuration table as text cells: the columns a reader ranks by, rounded, mean ± std."""
    view = pd.DataFrame(index=df.index)
    view["config"] = [f"{c} ({b})" if b else c for c, b in zip(df["config"], df["baseline"].fillna(""))]
    view["weights"] = df["weights"].map(lambda w: w if isinstance(w, str) else "")
    # Built cell by cell: under pandas' pyarrow strings a missing seed list is None, and string + None fails.
    view["runs"] = [_runs_cell(n, s, f, r) for n, s, f, r in zip(df["runs"], df["seeds"], df["failed"], df["running"])]
    for col, label, digits in (("wikitext_word_ppl", "wikitext ppl", 2), ("lambada_ppl", "lambada ppl", 2),
                               ("lambada_acc", "lambada acc", 4)):
        if df[col].notna().any():
            view[label] = [mean_pm_std(m, s, digits) for m, s in zip(df[col], df[f"{col}_std"])]
            view[f"{label} 95% CI"] = [interval_text(lo, hi, digits) for lo, hi in
                                       zip(df[f"{col}_ci_low"], df[f"{col}_ci_high"])]
    ranking = df["ranking_metric"].dropna()
    suffix = f" ({ranking.iloc[0]})" if len(ranking) else ""
    for col in ("vs_best", "vs_fp16"):
        view[col + suffix] = df[col].fillna("")
    for col, label, digits in (("delta_word_ppl", "Δ wikitext ppl", 2), ("weight_mb", "weight MB", 1),
                               ("quantize_s", "quantize s", 1), ("tokens_per_s", "tokens/s", 1)):
        view[label] = df[col].map(lambda v, d=digits: number(v, d))
    view["deterministic"] = df["deterministic"].map(lambda v: "" if v is None else str(v).lower())
    return view.reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    view = summary_view(df)
    return view.to_markdown(index=False, disable_numparse=True) + "\n\n" + NOTES + "\n\n" + WEIGHTS_NOTE
