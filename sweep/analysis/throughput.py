"""The report's throughput-vs-batch section: decode tokens/s per method at each `bench.batch_size`.

At batch 1 decode reads every weight once per token, so fewer weight bytes mean more tokens/s; as
the batch grows the same read serves more sequences and the matmuls become compute-bound, where a
low-bit kernel's dequantization costs more than its smaller reads save. The section draws tokens/s
against the batch for every configuration measured at two or more batch sizes, and tabulates each
one's ratio to the fp16 run at the same batch, with the first batch where that ratio drops below 1
(where the quantized model stops being faster).
"""
from __future__ import annotations

import html
from typing import List, Optional

import pandas as pd

from sweep.analysis.sections import ReportData, Section

# The decode loop measured, best first: the engine-style graph loop, compiled generate(), eager generate().
SPEED_COLUMNS = [("graph_tokens_per_s", "graph loop"), ("static_tokens_per_s", "static-cache generate()"),
                 ("tokens_per_s", "generate()")]
SERIES = ["method", "bits", "group_size", "kernel", "weights"]


def _series_name(row: pd.Series) -> str:
    if pd.isna(row["bits"]):
        return str(row["method"])
    group = "ch" if row["group_size"] == -1 else f"g{int(row['group_size'])}"
    kernel = row.get("kernel")
    kernel = "" if kernel in (None, "none") or pd.isna(kernel) else f", {str(kernel).split(' ')[0]}"
    return f"{row['method']} {int(row['bits'])}b {group} ({row['weights']}{kernel})"


def _speed_column(df: pd.DataFrame) -> Optional[tuple]:
    """The first decode measure taken at two or more batch sizes."""
    for col, name in SPEED_COLUMNS:
        if col in df and df.loc[df[col].notna(), "batch_size"].nunique() >= 2:
            return col, name
    return None


def batch_table(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """One row per configuration series: tokens/s at each batch, the ratio to fp16 at that batch, and
    the first batch where the ratio is below 1."""
    df = df[df[col].notna()].copy()
    df["series"] = df.apply(_series_name, axis=1)
    speeds = df.pivot_table(index="series", columns="batch_size", values=col, aggfunc="mean")
    fp16 = speeds.loc["fp16"] if "fp16" in speeds.index else None
    rows = []
    for series, values in speeds.iterrows():
        row = {"series": series}
        below = None
        for batch, value in values.items():
            if pd.isna(value):
                continue
            row[f"b{int(batch)} tokens/s"] = round(float(value), 1)
            if fp16 is not None and series != "fp16" and not pd.isna(fp16.get(batch)):
                ratio = float(value) / float(fp16[batch])
                row[f"b{int(batch)} vs fp16"] = round(ratio, 2)
                if below is None and ratio < 1:
                    below = int(batch)
        if series != "fp16" and fp16 is not None:
            row["slower than fp16 from batch"] = below if below is not None else "not within the batches run"
        rows.append(row)
    return pd.DataFrame(rows)


def report_section(data: ReportData) -> Optional[Section]:
    df = data.points
    if "batch_size" not in df or df["batch_size"].isna().all():
        return None
    df = df.assign(batch_size=pd.to_numeric(df["batch_size"], errors="coerce"))
    chosen = _speed_column(df)
    if chosen is None:
        return None
    col, measure = chosen
    table = batch_table(df, col)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    plotted = df[df[col].notna()].assign(series=lambda d: d.apply(_series_name, axis=1))
    for series, part in plotted.groupby("series"):
        part = part.groupby("batch_size")[col].mean().sort_index()
        ax.plot(part.index, part.values, marker="o", label=series,
                linestyle="--" if series == "fp16" else "-", color="black" if series == "fp16" else None)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size (sequences decoded together)", ylabel=f"decode tokens/s ({measure})",
           title="Throughput vs batch (higher is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    caption = (f"Decode tokens/s ({html.escape(measure)}, every sequence's tokens counted) at each "
               "<code>bench.batch_size</code>: one measurement per point (the median over its repeats; ITL "
               "percentiles in the run table), so only large gaps between lines are differences.")
    columns: List[str] = list(table.columns)
    return Section("Throughput vs batch", fig, caption, table[columns].to_html(index=False, classes="runs",
                                                                               na_rep=""))
