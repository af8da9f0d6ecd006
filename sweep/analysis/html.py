"""The report as one self-contained HTML page: tables plus matplotlib figures embedded as base64 PNG.

Built-in figures: WikiText-2 perplexity vs bits per method, quality vs packed weight size with
the Pareto front marked, decode tokens/s vs in-memory weights; each draws the fp16 baseline as a
reference line. With the configuration table each point is a configuration (the mean over its
seeds) and its error bar the 95% interval (evaluation and seed noise). More sections plug in without touching this file: append a function to
`EXTRA_SECTIONS` (or pass `extra=`); it gets the `ReportData` and returns a `Section` or None
(None: nothing to show for this sweep, e.g. no per-layer data).
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, List, Optional, Sequence

import pandas as pd

from sweep.analysis import configs as configs_table
from sweep.analysis.sections import ReportData, Section, SectionFn
from sweep.analysis.sensitivity import report_section as sensitivity_heatmap
from sweep.analysis.throughput import report_section as throughput_vs_batch
from sweep.analysis.table import rounded

WEIGHTS_NOTE = ("<b>weights</b>: <code>packed</code> = run by a low-bit kernel; <code>simulated</code> = "
                "quantize-dequantized values in the original dtype (quality is real; speed and in-memory size are "
                "those of the unquantized model); <code>unquantized</code> = the baseline. <b>weight_mb</b> is the size "
                "in the packed format (computed for simulated runs).")
QUALITY = "wikitext_word_ppl"
HIDDEN = ["config_hash", "config_group", "baseline_hash", "weights_sha256"]   # in the CSV, not on the page
SUMMARY_COLUMNS = ["method", "weights", "bits", "group_size", "wikitext_word_ppl", "delta_word_ppl", "lambada_acc",
                   "delta_lambada_acc", "weight_mb", "delta_weight_mb", "tokens_per_s", "status"]


# Extra figure sections, appended after the built-in ones (e.g. a per-layer sensitivity heat-map).
EXTRA_SECTIONS: List[SectionFn] = []


def pareto_front(df: pd.DataFrame, cost: str, loss: str) -> pd.Series:
    """True for rows no other row beats on both `cost` and `loss` (lower is better for both)."""
    ok = df[cost].notna() & df[loss].notna()
    front = pd.Series(False, index=df.index)
    best = math.inf
    for idx, row in df[ok].sort_values([cost, loss]).iterrows():
        if row[loss] < best:
            front[idx] = True
            best = row[loss]
    return front


def render_html(data: ReportData, extra: Optional[Sequence[SectionFn]] = None) -> str:
    sections = [s for s in (fn(data) for fn in (*BUILTIN_SECTIONS, *(EXTRA_SECTIONS if extra is None else extra)))
                if s is not None]
    df = data.table
    if data.configs is not None:
        summary = _table_html(configs_table.summary_view(data.configs))
        notes = f"<p class=note>{html.escape(configs_table.NOTES)}</p><p class=note>{WEIGHTS_NOTE}</p>"
    else:
        summary = _table_html(rounded(df[[c for c in SUMMARY_COLUMNS if c in df.columns]]))
        notes = f"<p class=note>{WEIGHTS_NOTE}</p>"
    parts = [f"<h1>{html.escape(data.title)}</h1>", f"<p>{_baseline_sentence(data.baseline_point)}</p>",
             "<h2>Summary</h2>", summary, notes]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.figure is not None:
            parts.append(f'<figure><img alt="{html.escape(section.title)}" src="data:image/png;base64,'
                         f'{_png_base64(section.figure)}"><figcaption>{section.caption}</figcaption></figure>')
        elif section.caption:
            parts.append(f"<p>{section.caption}</p>")
        parts.append(section.html)
    parts += ["<h2>Every run</h2>", _table_html(rounded(df.drop(columns=[c for c in HIDDEN if c in df.columns]))),
              f"<p class=note>{WEIGHTS_NOTE} Full precision: the CSV and Parquet files next to this page.</p>"]
    return _PAGE.format(title=html.escape(data.title), body="\n".join(parts))


def _baseline_sentence(base: Optional[pd.Series]) -> str:
    if base is None:
        return "No finished fp16 baseline with the same model and evaluation settings: deltas are empty."
    name = base.get("config", base.get("run"))
    return (f"Deltas are against the fp16 baseline <code>{html.escape(str(name))}</code>: WikiText-2 word "
            f"perplexity {base[QUALITY]:.2f}, LAMBADA accuracy {base['lambada_acc']:.3f}, "
            f"{base['weight_mb']:.1f} MB of weights.")


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", classes="runs", border=0, escape=True)


def _png_base64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- built-in figures ---------------------------------------------------------------------
def _plotted(data: ReportData, *cols: str) -> pd.DataFrame:
    df = data.points
    ok = pd.Series(True, index=df.index)
    for col in cols:
        ok &= df[col].notna()
    # nullable integers (blank for fp16) → float with NaN, which matplotlib takes
    return df[ok].assign(**{c: pd.to_numeric(df.loc[ok, c], errors="coerce").astype(float) for c in ("bits", "group_size")})


def _error_bars(df: pd.DataFrame, col: str):
    """Asymmetric error bars from the `<col>_ci_low/high` columns (absent or blank: none)."""
    low, high = f"{col}_ci_low", f"{col}_ci_high"
    if low not in df or high not in df or df[[low, high]].isna().all().all():
        return None
    lower = (df[col] - df[low].astype(float)).clip(lower=0).fillna(0)
    upper = (df[high].astype(float) - df[col]).clip(lower=0).fillna(0)
    return [lower.to_numpy(), upper.to_numpy()]


def _series_label(method: str, group_size: Any, weights: str) -> str:
    group = "" if pd.isna(group_size) else (" per-channel" if group_size == -1 else f" g{int(group_size)}")
    return f"{method}{group} ({weights})"


def _point_label(row: pd.Series) -> str:
    if "config" in row and isinstance(row["config"], str):
        return row["config"]
    if pd.isna(row["bits"]):
        return row["method"]
    group = "ch" if row["group_size"] == -1 else f"g{int(row['group_size'])}"
    return f"{row['method']} {int(row['bits'])}b {group}"


def _baseline_line(ax, base: Optional[pd.Series], col: str, axis: str = "y") -> None:
    if base is None or pd.isna(base.get(col)):
        return
    line = ax.axhline if axis == "y" else ax.axvline
    line(base[col], color="black", linestyle="--", linewidth=1, label=f"fp16 baseline ({base[col]:.4g})")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7.5, 4.5))


def perplexity_vs_bits(data: ReportData) -> Optional[Section]:
    df = _plotted(data, "bits", QUALITY)
    if df.empty:
        return None
    fig, ax = _figure()
    for (method, group, weights), part in df.groupby(["method", "group_size", "weights"], dropna=False):
        part = part.sort_values("bits")
        ax.errorbar(part["bits"], part[QUALITY], yerr=_error_bars(part, QUALITY), capsize=3,
                    marker="o" if weights == "packed" else "s", fillstyle="full" if weights == "packed" else "none",
                    label=_series_label(method, group, weights))
    _baseline_line(ax, data.baseline_point, QUALITY)
    ax.set_yscale("log")
    ax.set_xticks(sorted(df["bits"].unique()))
    ax.set(xlabel="bits per weight", ylabel="WikiText-2 word perplexity (log)",
           title="Perplexity vs bits (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return Section("WikiText-2 perplexity vs bits", fig,
                   "One line per method and group size; hollow markers are simulated weights; error bars are the "
                   "95% interval (evaluation and seed noise).")


def quality_vs_memory(data: ReportData) -> Optional[Section]:
    df = _plotted(data, "weight_mb", QUALITY)
    base = data.baseline_point
    if data.baseline is not None and not (df["method"] == "fp16").any():
        df = pd.concat([df, base.to_frame().T], ignore_index=True).infer_objects()
    if df.empty:
        return None
    front = pareto_front(df, "weight_mb", QUALITY)
    fig, ax = _figure()
    for method, part in df.groupby("method"):
        ax.errorbar(part["weight_mb"], part[QUALITY], yerr=_error_bars(part, QUALITY), fmt="o", capsize=3,
                    markersize=6, label=method, zorder=3)
    on_front = df[front].sort_values("weight_mb")
    ax.plot(on_front["weight_mb"], on_front[QUALITY], color="crimson", drawstyle="steps-post", linewidth=1.2,
            zorder=2, label="Pareto front")
    ax.scatter(on_front["weight_mb"], on_front[QUALITY], s=140, facecolors="none", edgecolors="crimson", zorder=4)
    for _, row in df.iterrows():
        ax.annotate(_point_label(row), (row["weight_mb"], row[QUALITY]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    _baseline_line(ax, base, QUALITY)
    ax.set_yscale("log")
    ax.set(xlabel="weight size in the packed format (MB)", ylabel="WikiText-2 word perplexity (log)",
           title="Quality vs weight memory (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    name = "config" if "config" in df else "run"
    shown = [c for c in (name, "method", "weights", "bits", "group_size", "weight_mb", QUALITY, "delta_word_ppl",
                         "vs_best") if c in df]
    table = df[front].sort_values("weight_mb")[shown]
    return Section("Quality vs weight memory", fig,
                   "Circled points are on the Pareto front: no other point is both smaller and better. A front "
                   "point whose vs_best says <code>same</code> is within the noise of the best one.",
                   "<h3>Pareto front</h3>" + _table_html(rounded(table)))


def speed_vs_memory(data: ReportData) -> Optional[Section]:
    df = _plotted(data, "in_memory_mb", "tokens_per_s")
    if "batch_size" in df:  # batch 1 only (runs from before the column: blank); other batches: throughput_vs_batch
        df = df[df["batch_size"].isna() | (pd.to_numeric(df["batch_size"], errors="coerce") == 1)]
    if df.empty:
        return None
    fig, ax = _figure()
    for (method, weights), part in df.groupby(["method", "weights"]):
        ax.scatter(part["in_memory_mb"], part["tokens_per_s"], label=f"{method} ({weights})", s=36,
                   marker="o" if weights == "packed" else "s")
    for _, row in df.iterrows():
        ax.annotate(_point_label(row), (row["in_memory_mb"], row["tokens_per_s"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    _baseline_line(ax, data.baseline_point, "tokens_per_s")
    ax.set(xlabel="weights in memory as run (MB)", ylabel="decode tokens/s (batch 1)",
           title="Speed vs memory (upper left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    caption = "Decode throughput against the memory the weights took while it was measured."
    if (df["weights"] == "simulated").any():
        caption += " Simulated runs hold dequantized weights, so their speed and memory are those of the baseline."
    return Section("Tokens/s vs memory", fig, caption)


BUILTIN_SECTIONS: List[SectionFn] = [perplexity_vs_bits, quality_vs_memory, speed_vs_memory, throughput_vs_batch,
                                     sensitivity_heatmap]

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }}
table.runs {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }}
table.runs th, table.runs td {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }}
table.runs th {{ background: #f3f3f3; }}
figure {{ margin: 0.5em 0 1.5em 0; }} figure img {{ max-width: 100%; }}
figcaption, .note {{ color: #555; font-size: 13px; max-width: 60em; }}
</style></head>
<body>
{body}
</body></html>
"""
