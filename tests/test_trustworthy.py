"""Trustworthy comparisons end to end: seeds as a grid axis, the baseline in every sweep, intervals and
verdicts in the report, and a grid point that reproduces bit for bit in a fresh process.

One real sweep of the 4-layer model (`method=gptq bits=3,4 seed=0,1`, no fp16 in the grid) into a
temporary store, read back by the report (`sweep.report.main`, in this process).
"""
from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hydra.core.global_hydra import GlobalHydra

from conftest import EXPERIMENT, FAST, REPO, run_report, run_sweep

QUALITY = ("wikitext.word_perplexity", "wikitext.byte_perplexity", "lambada.perplexity", "lambada.acc")


def _points(tmp):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'point'", max_results=100)


def _single(tmp, *args, **kwargs):
    cmd = [sys.executable, "-m", "sweep", *FAST, *args, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
           f"tracking.artifact_location={tmp}/artifacts"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, embedded_model_dir):
    tmp = tmp_path_factory.mktemp("seeds")
    proc = run_sweep(tmp, "grid", "method=gptq", "bits=3,4", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = run_report(tmp, tmp / "report")
    assert report.returncode == 0, report.stdout[-4000:]
    table = pd.read_csv(next(p for p in (tmp / "report").glob("sweep-*.csv") if not p.stem.endswith("-runs")))
    return tmp, proc, report, table


def test_every_sweep_runs_its_baseline_once_before_the_grid(seeds):
    tmp, proc, _, table = seeds
    _, points = _points(tmp)
    methods = sorted(r.data.tags["method"] for r in points)
    assert methods == ["fp16", "gptq", "gptq", "gptq", "gptq"]
    assert proc.stderr.index("[baseline] fp16") < proc.stderr.index("[1/4]")
    base = table[table["method"] == "fp16"].iloc[0]
    assert base["baseline"] == "baseline, ran in this sweep" and base["vs_fp16"] == "baseline"
    # Every quantized configuration has its deltas and its verdict against the baseline.
    quantized = table[table["method"] == "gptq"]
    assert quantized["delta_word_ppl"].notna().all() and quantized["vs_fp16"].notna().all()


def test_seed_is_a_grid_axis_and_the_report_aggregates_over_it(seeds):
    tmp, _, report, table = seeds
    _, points = _points(tmp)
    gptq = [r for r in points if r.data.tags["method"] == "gptq"]
    # The calibration draw follows the seed: the same bits with another seed is another run, other weights.
    by_bits = {}
    for run in gptq:
        assert run.data.params["calibration.seed"] == run.data.params["seed"]
        by_bits.setdefault(run.data.params["bits"], []).append(run)
    for bits, runs in by_bits.items():
        assert len({r.data.tags["weights.sha256"] for r in runs}) == 2
        assert len({r.data.tags["sweep.config_group"] for r in runs}) == 1
        row = table[(table["method"] == "gptq") & (table["bits"] == int(bits))].iloc[0]
        assert row["runs"] == 2 and row["seeds"] == "0,1"
        for metric, col in (("wikitext.word_perplexity", "wikitext_word_ppl"), ("lambada.acc", "lambada_acc")):
            values = [r.data.metrics[metric] for r in runs]
            assert row[col] == pytest.approx(np.mean(values))
            assert row[f"{col}_std"] == pytest.approx(np.std(values, ddof=1))
            assert (row[f"{col}_min"], row[f"{col}_max"]) == (min(values), max(values))
    # LAMBADA's 20 passages carry the verdicts (1 WikiText article is too few to test): each configuration
    # is marked against the best one and the baseline, with the p-value of the paired comparison.
    assert set(table["ranking_metric"]) == {"lambada_ppl"}
    assert (table["vs_best"] == "best").sum() == 1
    assert table["vs_best"].str.match(r"^(best|same|worse|better)").all()
    assert table.loc[table["vs_best"] != "best", "p_vs_best"].between(0, 1).all()
    assert table["lambada_ppl_ci_low"].notna().all() and (table["lambada_ppl_ci_low"] <= table["lambada_ppl"]).all()
    md = next(p for p in (tmp / "report").glob("sweep-*.md")).read_text()
    assert " ± " in md and "95% CI" in md and "vs_best" in md
    assert "2 (seeds 0,1)" in md and "vs_best" in report.stdout


def test_a_grid_point_reproduces_bit_for_bit_in_a_fresh_process(seeds):
    tmp, _, _, _ = seeds
    client, points = _points(tmp)
    first = next(r for r in points if r.data.tags["method"] == "gptq" and r.data.params["bits"] == "3"
                 and r.data.params["seed"] == "1")
    proc = _single(tmp, "method=gptq", "bits=3", "seed=1", "force=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, points = _points(tmp)
    again = max((r for r in points if r.data.tags["sweep.config_hash"] == first.data.tags["sweep.config_hash"]),
                key=lambda r: r.info.start_time)
    assert again.info.run_id != first.info.run_id
    assert again.data.tags["weights.sha256"] == first.data.tags["weights.sha256"]
    assert again.data.tags["deterministic"] == first.data.tags["deterministic"] == "true"
    for metric in QUALITY + ("wikitext.word_perplexity_items", "lambada.perplexity_ci_low", "lambada.acc_ci_high",
                             "memory.packed_weights_mb"):
        assert again.data.metrics[metric] == first.data.metrics[metric], metric
    # A single run ends by saying what it measured, with intervals, and where to look next.
    assert "95% interval" in proc.stderr and "vs fp16" in proc.stderr
    assert "python -m sweep.report" in proc.stderr and "mlflow ui" in proc.stderr


def test_a_relaunch_reuses_the_baseline_and_a_new_sweep_reuses_it_too(seeds):
    tmp, _, _, _ = seeds
    again = run_sweep(tmp, "grid", "method=gptq", "bits=3,4", "seed=0,1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished") == 5
    other = run_sweep(tmp, "other", "method=rtn", "bits=4")
    assert other.returncode == 0, other.stderr[-3000:]
    assert "[baseline] fp16" in other.stderr and "already finished" in other.stderr
    _, points = _points(tmp)
    assert sorted(r.data.tags["method"] for r in points).count("fp16") == 1   # never run twice
    summary = pd.read_csv(tmp / "other" / "summary.csv")
    assert summary.loc[summary["method"] == "fp16", "baseline"].iloc[0].startswith("baseline, reused run")
    assert summary.loc[summary["method"] == "rtn", "delta_word_ppl"].notna().all()


def test_points_that_differ_only_in_eval_measure_one_quantized_model_with_a_fresh_ones_numbers(seeds):
    """The second point reuses the first one's quantized model (sweep/pipeline/reuse.py); its weights and its
    WikiText-2 numbers equal those of the same point quantized in another process (the fixture's run)."""
    tmp, _, _, _ = seeds
    proc = run_sweep(tmp, "reuse", "method=gptq", "bits=4", "seed=1", "eval.limit.lambada=20,30", "force=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reused (this point differs only in bench/eval)" in proc.stderr
    client, points = _points(tmp)
    parent = next(r for r in client.search_runs([points[0].info.experiment_id], "tags.`sweep.role` = 'sweep'")
                  if r.data.tags.get("sweep.dir", "").endswith("reuse"))
    mine = sorted((r for r in points if r.data.tags.get("sweep.id") == parent.data.tags["sweep.id"]
                   and r.data.tags["method"] == "gptq"), key=lambda r: r.info.start_time)
    assert [r.data.params["eval.limit.lambada"] for r in mine] == ["20", "30"]
    first, second = mine
    assert "quantized.reused_from" not in first.data.tags
    assert second.data.tags["quantized.reused_from"] == first.info.run_id
    fresh = next(r for r in points if r.data.tags["sweep.config_hash"] == first.data.tags["sweep.config_hash"]
                 and r.info.run_id != first.info.run_id)          # the fixture's own run of this point
    assert second.data.tags["weights.sha256"] == first.data.tags["weights.sha256"] == fresh.data.tags["weights.sha256"]
    # It logs what producing the model cost (the first run's quantization), not zero.
    assert second.data.metrics["time.quantize_s"] == first.data.metrics["time.quantize_s"] > 0
    assert second.data.tags["calibration.fingerprint"] == first.data.tags["calibration.fingerprint"]
    for metric in ("wikitext.word_perplexity", "wikitext.byte_perplexity", "wikitext.bits_per_byte"):
        assert second.data.metrics[metric] == first.data.metrics[metric] == fresh.data.metrics[metric], metric
    assert second.data.metrics["lambada.samples"] == 30 and first.data.metrics["lambada.samples"] == 20


def test_a_held_model_is_dropped_for_another_key_and_not_passed_on_once_cast(tmp_path):
    import torch

    from sweep.methods.base import QuantReport
    from sweep.pipeline import reuse

    def held(key):
        workdir = tmp_path / key
        workdir.mkdir()
        return reuse.HeldModel(key, torch.nn.Linear(2, 2), None, QuantReport("none", "simulated"), "run", str(workdir), torch.float32)

    a = held("a")
    reuse.keep(a)
    assert reuse.take("a") is a                      # taken: no longer held
    reuse.keep(a)
    assert reuse.take("b") is None and not (tmp_path / "a").exists()   # another key drops it and its files
    c = held("c")
    c.model.to(torch.float64)                        # what eval.dtype does to a simulated model
    reuse.keep(c)
    assert reuse.take("c") is None and not (tmp_path / "c").exists()
    reuse.release()


def test_report_without_a_sweep_shows_the_latest_runs(tmp_path, monkeypatch, capsys, embedded_model_dir):
    # The single run and the report in this process (a single run's CLI in a fresh process is
    # test_a_grid_point_reproduces_bit_for_bit_in_a_fresh_process's; the report's, test_sweep_e2e's).
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["sweep", *FAST, "method=rtn", "bits=8", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                      f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.run.dir={tmp_path}/run"])
    from sweep.__main__ import app

    GlobalHydra.instance().clear()
    app()
    assert "no finished fp16 run" in capsys.readouterr().err  # nothing to compare with yet, and it says so
    report = run_report(tmp_path, tmp_path / "report")
    assert report.returncode == 0, report.stdout
    assert "no sweep in experiment" in report.stdout and "rtn 8b" in report.stdout
    assert (tmp_path / "report" / "latest.csv").is_file()


def test_an_interrupted_single_run_ends_with_one_line_not_a_traceback(tmp_path, embedded_model_dir):
    cmd = [sys.executable, "-m", "sweep", "model=smollm2-135m-4l", "method=rtn", "bits=4", "bench=none", "eval=full",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "eval ..." in line:   # well inside the run: the whole test set is being scored
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: run ")
    client, (run,) = _points(tmp_path)
    assert run.info.status == "KILLED"
    assert "error/traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id, "error")}
