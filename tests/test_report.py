"""The report's table logic and HTML page on hand-made runs and per-item results (no model, no store)."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sweep.analysis import configs
from sweep.analysis.export import write_report
from sweep.analysis.html import ReportData, Section, pareto_front, render_html
from sweep.analysis.table import COLUMNS, DELTAS, TRAILING, rounded

DOCS = 12


_TEXT = np.random.default_rng(99)
WORDS = _TEXT.integers(200, 2000, DOCS).astype(float)          # the test set: the same for every run
DIFFICULTY = 3.5 + _TEXT.normal(0, 0.4, DOCS)                  # nats per word, per document
PASSAGES = 50
PASSAGE_NLL = _TEXT.gamma(2.0, 1.5, PASSAGES)


def _items(rng: np.random.Generator, shift: float) -> dict:
    """Per-item results of one run: every document's nll per word raised by `shift`, plus a little noise."""
    nll = WORDS * (DIFFICULTY + shift + rng.normal(0, 0.02, DOCS))
    return {"wikitext": {"doc_id": list(range(DOCS)), "nll": list(nll), "words": list(WORDS),
                         "bytes": list(WORDS * 5.5)},
            "lambada": {"doc_id": list(range(PASSAGES)), "nll": list(PASSAGE_NLL + shift + rng.normal(0, 0.1, PASSAGES)),
                        "correct": list((rng.random(PASSAGES) < 0.4).astype(float))}}


def _runs(rows) -> pd.DataFrame:
    """A per-run table as build_table makes it, from (method, weights, bits, group, seed, ppl, mb, tps, group_key)."""
    df = pd.DataFrame([{col: None for col in [*COLUMNS, *DELTAS, *TRAILING]} for _ in rows])
    for i, (method, weights, bits, group, seed, ppl, mb, tps, key) in enumerate(rows):
        df.loc[i, ["run", "status", "method", "weights", "run_id", "config_group", "config_hash", "baseline_hash",
                   "seeded", "deterministic"]] = [f"{method}{bits}-s{seed}", "FINISHED", method, weights, f"id{i}",
                                                  key, f"{key}-{seed}", "base", str(method == "gptq").lower(), "true"]
        df.loc[i, ["bits", "group_size", "seed", "wikitext_word_ppl", "weight_mb", "in_memory_mb", "tokens_per_s",
                   "lambada_acc", "lambada_ppl"]] = [bits, group, seed, ppl, mb, 500.0, tps, 0.3, 40.0]
    for col in ("bits", "group_size", "wikitext_word_ppl", "weight_mb", "in_memory_mb", "tokens_per_s", "lambada_acc",
                "lambada_ppl"):
        df[col] = df[col].astype(float)
    df[["bits", "group_size"]] = df[["bits", "group_size"]].astype("Int64")
    df["delta_word_ppl"] = df["wikitext_word_ppl"] - 30.0
    return df


ROWS = [("fp16", "unquantized", math.nan, math.nan, 0, 30.0, 500.0, 20.0, "base"),
        ("rtn", "simulated", 4, 128, 0, 60.0, 150.0, 20.5, "rtn4"),
        ("gptq", "simulated", 4, 128, 0, 44.0, 150.0, 20.1, "gptq4"),
        ("gptq", "simulated", 4, 128, 1, 45.0, 150.0, 20.1, "gptq4"),
        ("gptq", "simulated", 4, 128, 2, 49.0, 150.0, 20.1, "gptq4"),
        ("gptq", "simulated", 3, 128, 0, 400.0, 120.0, 20.3, "gptq3"),
        ("gptq", "simulated", 2, 128, 0, math.nan, 90.0, 20.2, "gptq2")]   # no perplexity: not on the front


def test_pareto_front_keeps_only_undominated_points():
    df = _runs(ROWS)
    front = pareto_front(df, "weight_mb", "wikitext_word_ppl")
    assert df[front]["run"].tolist() == ["fp16nan-s0", "gptq4-s0", "gptq3-s0"]


def test_runs_that_differ_only_in_seed_are_one_configuration_with_their_spread():
    df = _runs(ROWS)
    table = configs.build_configurations(df, items={})
    gptq4 = table[table["config_group"] == "gptq4"].iloc[0]
    assert gptq4["runs"] == 3 and gptq4["seeds"] == "0,1,2"
    assert gptq4["wikitext_word_ppl"] == pytest.approx(46.0)
    assert gptq4["wikitext_word_ppl_std"] == pytest.approx(np.std([44.0, 45.0, 49.0], ddof=1))
    assert (gptq4["wikitext_word_ppl_min"], gptq4["wikitext_word_ppl_max"]) == (44.0, 49.0)
    assert math.isnan(table[table["config_group"] == "rtn4"].iloc[0]["wikitext_word_ppl_std"])  # one run: no spread
    # Deltas against the baseline configuration, for every configuration.
    assert gptq4["delta_word_ppl"] == pytest.approx(16.0)
    assert table[table["method"] == "fp16"].iloc[0]["delta_word_ppl"] == 0
    # Without per-item results nothing is tested, and the table says so instead of guessing.
    assert table[table["config_group"] == "rtn4"].iloc[0]["vs_best"].startswith("untested")


def test_configurations_with_the_same_method_bits_and_group_are_told_apart_by_their_settings():
    """The H200's store had quanto int8 and float8 weights, and AutoRound tuned and in RTN mode, as pairs of rows that
    read the same (`quanto 8b g64`): each label now names the settings in which its configuration differs."""
    df = _runs(ROWS + [("quanto", "packed", 8, 64, 0, 34.0, 155.0, 20.0, "q-int"),
                       ("quanto", "packed", 8, 64, 0, 34.5, 155.0, 20.0, "q-f8")])
    df.loc[df["config_group"] == "q-int", "settings"] = "method.optimizer=auto; method.weights=int"
    df.loc[df["config_group"] == "q-f8", "settings"] = "method.optimizer=auto; method.weights=float8"
    df.loc[df["config_group"] == "gptq4", "settings"] = "eval.limit.wikitext=2; method.damp_percent=0.01"
    table = configs.build_configurations(df, items={}).set_index("config_group")
    assert table.loc["q-int", "config"] == "quanto 8b g64 weights=int"
    assert table.loc["q-f8", "config"] == "quanto 8b g64 weights=float8"
    # A label no other configuration shares stays short.
    assert table.loc["gptq4", "config"] == "gptq 4b g128" and table.loc["rtn4", "config"] == "rtn 4b g128"
    assert table["config"].is_unique


def test_configurations_whose_runs_all_failed_are_listed_with_no_runs():
    """A grid point that failed on every seed has an empty seed list; the text table still lists it. (On the GPU
    machine's pandas the old column arithmetic, string + per-row suffix, raised for a store where every run had
    failed; the cells are now built one by one.)"""
    df = _runs(ROWS + [("awq", "packed", 4, 64, 0, math.nan, math.nan, math.nan, "awq4")])
    df.loc[df["config_group"] == "awq4", "status"] = "FAILED"
    table = configs.build_configurations(df, items={})
    view = configs.summary_view(table)
    assert view[table["config_group"] == "awq4"].iloc[0]["runs"] == "0, 1 failed"
    assert view[table["config_group"] == "awq4"].iloc[0]["weights"] == "packed"
    assert view[table["config_group"] == "gptq4"].iloc[0]["runs"] == "3 (seeds 0,1,2)"
    df["status"] = "FAILED"
    every_failed = configs.build_configurations(df, items={})
    assert configs.summary_view(every_failed)["runs"].str.startswith("0, ").all()


def test_a_run_still_running_is_not_counted_as_failed():
    """`--all` during a sweep: the point in progress has a RUNNING run with no params yet (the text table showed
    its weights as `nan` and counted it as failed)."""
    df = _runs(ROWS + [("gptq", None, math.nan, math.nan, 0, math.nan, math.nan, math.nan, "gptq-new")])
    df.loc[df["config_group"] == "gptq-new", "status"] = "RUNNING"
    table = configs.build_configurations(df, items={})
    running = table[table["config_group"] == "gptq-new"].iloc[0]
    assert (running["runs"], running["failed"], running["running"]) == (0, 0, 1)
    cell = configs.summary_view(table)[table["config_group"] == "gptq-new"].iloc[0]
    assert (cell["runs"], cell["weights"]) == ("0, 1 running", "")
    # The baseline's note says the same of a baseline still running.
    df.loc[df["config_group"] == "base", "status"] = "RUNNING"
    table = configs.build_configurations(df, items={})
    assert table[table["config_group"] == "base"].iloc[0]["baseline"] == "baseline, running"


def test_verdicts_come_from_paired_items_and_seed_spread():
    rng = np.random.default_rng(0)
    df = _runs(ROWS)
    shifts = {"base": 0.0, "rtn4": 0.5, "gptq4": 0.2, "gptq3": 2.0, "gptq2": 4.0}
    items = {row["run_id"]: _items(rng, shifts[row["config_group"]]) for _, row in df.iterrows()}
    # The per-run metric values follow the items, as they do in a real run.
    for _, row in df.iterrows():
        wt = items[row["run_id"]]["wikitext"]
        df.loc[df["run_id"] == row["run_id"], "wikitext_word_ppl"] = math.exp(sum(wt["nll"]) / sum(wt["words"]))
    table = configs.build_configurations(df, items).set_index("config_group")
    assert table.loc["base", "vs_best"] == "best" and table.loc["base", "vs_fp16"] == "baseline"
    assert table.loc["gptq3", "vs_best"].startswith("worse") and table.loc["gptq3", "p_vs_best"] < 0.05
    assert table.loc["rtn4", "vs_fp16"].startswith("worse")
    # RTN is not seeded: one run is complete. GPTQ with three seeds counts its seed spread.
    assert "eval only" not in table.loc["gptq4", "vs_fp16"]
    assert table.loc["gptq4", "wikitext_word_ppl_ci_low"] < table.loc["gptq4", "wikitext_word_ppl"] \
        < table.loc["gptq4", "wikitext_word_ppl_ci_high"]


def test_rounding_is_for_people_only(tmp_path):
    df = _runs(ROWS)
    df.loc[1, "wikitext_word_ppl"] = 60.123456789
    assert rounded(df)["wikitext_word_ppl"][1] == "60.12"
    table = configs.build_configurations(df, items={})
    paths = write_report(df, table, tmp_path / "r", "t")
    assert pd.read_parquet(tmp_path / "r-runs.parquet")["wikitext_word_ppl"][1] == 60.123456789
    assert pd.read_csv(tmp_path / "r-runs.csv")["wikitext_word_ppl"][1] == 60.123456789
    exact = pd.read_csv(tmp_path / "r.csv")
    assert exact.loc[exact["config_group"] == "rtn4", "wikitext_word_ppl"].iloc[0] == 60.123456789
    md = (tmp_path / "r.md").read_text()
    assert "60.12 " in md and "60.123" not in md
    assert "46.00 ± 2.65" in md  # gptq4's three seeds: mean ± std
    assert [p.name for p in paths] == ["r.csv", "r.md", "r.parquet", "r-runs.csv", "r-runs.parquet", "r.html"]


def test_html_page_is_self_contained_with_figures_and_extra_sections():
    import matplotlib.pyplot as plt

    df = _runs(ROWS)

    def extra(data: ReportData):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        return Section("Layer sensitivity", fig, "an extra figure")

    page = render_html(ReportData(df, "my sweep", configs=configs.build_configurations(df, {})),
                       extra=[extra, lambda data: None])
    assert page.count("data:image/png;base64,") == 4  # three built-in figures + the extra one
    assert "Layer sensitivity" in page and "fp16 baseline" in page and "error bars" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in text and "http" not in text  # nothing is fetched
    assert page.count("<th>weights</th>") >= 3  # every table says packed/simulated


def test_throughput_vs_batch_compares_each_batch_with_fp16_at_the_same_batch():
    from sweep.analysis.throughput import batch_table, report_section

    rows = []
    for batch, fp16_tps, int4_tps in [(1, 100.0, 180.0), (4, 380.0, 560.0), (16, 1400.0, 1300.0), (64, 4000.0, 3100.0)]:
        rows += [("fp16", "unquantized", math.nan, math.nan, 0, 30.0, 500.0, fp16_tps, f"base{batch}"),
                 ("gptq", "packed", 4, 128, 0, 33.0, 150.0, int4_tps, f"gptq{batch}")]
    df = _runs(rows)
    df["batch_size"] = [batch for batch in (1, 4, 16, 64) for _ in range(2)]
    table = batch_table(df, "tokens_per_s")
    gptq = table[table["series"].str.startswith("gptq")].iloc[0]
    assert gptq["b1 vs fp16"] == 1.8 and gptq["b16 vs fp16"] == round(1300 / 1400, 2)
    assert gptq["slower than fp16 from batch"] == 16
    section = report_section(ReportData(df, "batches"))
    assert section is not None and "Throughput vs batch" == section.title and "b64 tokens/s" in section.html
    # one batch size only: no section, and the batch-1 speed figure keeps every point
    single = df[df["batch_size"] == 1]
    assert report_section(ReportData(single, "one batch")) is None


@pytest.mark.parametrize("command", ["sweep.report", "sweep.allocate"])
def test_the_commands_that_read_a_store_do_not_import_the_measurements(command):
    """`python -m sweep.report` and `python -m sweep.allocate` need pandas and MLflow, not
    torch/transformers/lm-eval: the report imported torch (2-2.5 s of its start) through two constants,
    the artifact names, held by the measurement modules; the allocation through the formula for a packed
    format's bits per weight, held by the torch quantizer (now sweep/quant/storage.py)."""
    code = (f"import sys, {command}; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
