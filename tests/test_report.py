"""The report's table logic and HTML page on a hand-made table (no model, no store)."""
from __future__ import annotations

import math
import re

import pandas as pd

from sweep.analysis.table import COLUMNS, DELTAS, TRAILING, rounded
from sweep.analysis.export import write_report
from sweep.analysis.html import ReportData, Section, pareto_front, render_html


def _table() -> pd.DataFrame:
    rows = [("fp16", "unquantized", math.nan, math.nan, 30.0, 500.0, 20.0),
            ("rtn", "simulated", 4, 128, 60.0, 150.0, 20.5),
            ("gptq", "simulated", 4, 128, 45.0, 150.0, 20.1),   # beats rtn at the same size
            ("gptq", "simulated", 3, 128, 400.0, 120.0, 20.3),
            ("gptq", "simulated", 2, 128, math.nan, 90.0, 20.2)]  # no perplexity: not on the front
    df = pd.DataFrame([{col: None for col in [*COLUMNS, *DELTAS, *TRAILING]} for _ in rows])
    for i, (method, weights, bits, group, ppl, mb, tps) in enumerate(rows):
        df.loc[i, ["run", "status", "method", "weights", "run_id"]] = [f"{method}{bits}", "FINISHED", method, weights, f"id{i}"]
        df.loc[i, ["bits", "group_size", "wikitext_word_ppl", "weight_mb", "in_memory_mb", "tokens_per_s",
                   "lambada_acc"]] = [bits, group, ppl, mb, 500.0, tps, 0.3]
    for col in ("bits", "group_size", "wikitext_word_ppl", "weight_mb", "in_memory_mb", "tokens_per_s", "lambada_acc"):
        df[col] = df[col].astype(float)
    df["delta_word_ppl"] = df["wikitext_word_ppl"] - 30.0
    return df


def test_pareto_front_keeps_only_undominated_points():
    df = _table()
    front = pareto_front(df, "weight_mb", "wikitext_word_ppl")
    assert df[front]["run"].tolist() == ["fp16nan", "gptq4", "gptq3"]


def test_rounding_is_for_people_only(tmp_path):
    df = _table()
    df.loc[1, "wikitext_word_ppl"] = 60.123456789
    assert rounded(df)["wikitext_word_ppl"][1] == "60.12"
    paths = write_report(df, tmp_path / "r", "t")
    assert pd.read_parquet(tmp_path / "r.parquet")["wikitext_word_ppl"][1] == 60.123456789
    assert pd.read_csv(tmp_path / "r.csv")["wikitext_word_ppl"][1] == 60.123456789
    assert "60.12 " in (tmp_path / "r.md").read_text() and "60.123" not in (tmp_path / "r.md").read_text()
    assert [p.suffix for p in paths] == [".csv", ".md", ".parquet", ".html"]


def test_html_page_is_self_contained_with_figures_and_extra_sections():
    import matplotlib.pyplot as plt

    df = _table()

    def extra(data: ReportData):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        return Section("Layer sensitivity", fig, "an extra figure")

    page = render_html(ReportData(df, "my sweep", baseline=df.iloc[0]), extra=[extra, lambda data: None])
    assert page.count("data:image/png;base64,") == 4  # three built-in figures + the extra one
    assert "Layer sensitivity" in page and "fp16 baseline" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in text and "http" not in text  # nothing is fetched
    assert page.count("<th>weights</th>") >= 3  # every table says packed/simulated

