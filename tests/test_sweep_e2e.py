"""The whole loop through the real CLI: Hydra multirun → quantize → lm-eval → MLflow store → report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from conftest import EXPERIMENT, FAST, REPO, run_sweep as _sweep
from sweep.data.vendored import CHECKSUMS
from sweep.analysis.configs import config_columns
from sweep.analysis.table import COLUMNS, DELTAS

def _runs(tmp_path, role):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([exp.experiment_id], f"tags.`sweep.role` = '{role}'", max_results=100)


def test_parent_run_with_one_child_per_grid_point(store):
    tmp, proc = store
    client, parents = _runs(tmp, "sweep")
    _, children = _runs(tmp, "point")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["sweep.grid_size"] == "3"
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["method"] for c in children} == {"fp16", "rtn", "gptq"}
    assert "[3/3]" in proc.stderr  # progress names the grid point


def test_child_runs_hold_params_metrics_tags_and_artifacts(store):
    tmp, _ = store
    client, children = _runs(tmp, "point")
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["bits"] == "4" and run.data.params["model.num_layers"] == "4"
        m = run.data.metrics
        for key in ("wikitext.word_perplexity", "wikitext.bits_per_byte", "lambada.perplexity", "lambada.acc",
                    "memory.weights_mb", "memory.packed_weights_mb", "memory.peak_mb", "memory.disk_mb",
                    "time.quantize_s", "time.eval_s", "lambada.acc_ci_low", "lambada.acc_stderr"):
            assert key in m, (run.data.tags["method"], key)
        # Latency is timed where it says something: simulated weights decode at the unquantized model's
        # speed, which the baseline measures; they keep their sample generations.
        timed = ("latency.ttft_ms_p50", "latency.tokens_per_s", "latency.itl_ms_p50")
        if run.data.tags["weights"] == "simulated":
            assert not set(timed) & set(m) and "baseline measures it" in run.data.tags["latency.skipped"]
        else:
            assert set(timed) <= set(m)
        assert m["wikitext.word_perplexity"] > 1 and 0 <= m["lambada.acc"] <= 1
        # SmolLM2 ties its embedding to the head, which every decode step reads whole.
        assert m["memory.decode_read_mb"] == pytest.approx(m["memory.weights_mb"])
        tags = run.data.tags
        for key in ("backend", "weights", "device", "git.sha", "version.torch", "version.lm_eval", "calibration",
                    "dtype", "sweep.config_hash", "host.cpu", "cpu.bf16_instructions"):
            assert tags.get(key), key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "samples.json", "lm_eval_results.json", "eval_items.json"} <= artifacts
        # The evaluation data as dataset inputs, told apart by their checksums.
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert inputs["wikitext-2-raw-v1/test"].dataset.digest == CHECKSUMS["wikitext-2-raw-v1.test.raw"][:16]
        assert inputs["lambada_openai/test"].dataset.digest == CHECKSUMS["lambada_openai.test.jsonl"][:16]
        assert json.loads(inputs["lambada_openai/test"].dataset.profile)["limit"] == 20
        contexts = {d.dataset.name: d.tags[0].value for d in run.inputs.dataset_inputs}
        assert contexts["wikitext-2-raw-v1/test"] == "eval"
        assert ("lambada/development" in contexts) == (run.data.tags["method"] == "gptq")
    by_method = {r.data.tags["method"]: r for r in children}
    assert by_method["fp16"].data.tags["weights"] == "unquantized"
    assert by_method["rtn"].data.tags["weights"] == "simulated"
    assert by_method["gptq"].data.tags["calibration"].startswith("lambada_dev")
    # A 4-bit packed model weighs far less than the fp32 baseline; the simulated one still weighs the same in memory.
    assert by_method["rtn"].data.metrics["memory.packed_weights_mb"] < 0.9 * by_method["fp16"].data.metrics["memory.packed_weights_mb"]
    local = client.download_artifacts(by_method["rtn"].info.run_id, "samples.json", str(tmp))
    samples = json.loads(Path(local).read_text())
    assert len(samples) == 3 and all(s["completion"] for s in samples)


def test_report_reads_the_store_back(store):
    tmp, _ = store
    proc = subprocess.run([sys.executable, "-m", "sweep.report", "--experiment", EXPERIMENT, "--tracking-uri",
                           f"sqlite:///{tmp}/mlflow.db", "--out", str(tmp / "report")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    csv = next(p for p in (tmp / "report").glob("sweep-*.csv") if not p.stem.endswith("-runs"))
    runs_csv = csv.with_name(csv.stem + "-runs.csv")
    # One row per run, in the documented column order ...
    per_run = pd.read_csv(runs_csv)
    assert list(per_run.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert len(per_run) == 3 and set(DELTAS) <= set(per_run.columns)
    base = per_run[per_run.method == "fp16"].iloc[0]
    assert base["delta_word_ppl"] == 0
    rtn = per_run[per_run.method == "rtn"].iloc[0]
    assert rtn["delta_word_ppl"] == pytest.approx(rtn["wikitext_word_ppl"] - base["wikitext_word_ppl"])
    # ... and one per configuration (here each ran once), with the configuration columns.
    df = pd.read_csv(csv)
    assert list(df.columns) == config_columns() and len(df) == 3 and set(df["runs"]) == {1}
    assert df.loc[df.method == "fp16", "baseline"].iloc[0] == "baseline, ran in this sweep"
    md = csv.with_suffix(".md").read_text()
    assert "simulated" in md and "unquantized" in md and "vs_best" in md
    # CSV and Parquet hold the store's numbers unrounded, same columns in the same order.
    _, children = _runs(tmp, "point")
    logged_ppl = {r.info.run_id: r.data.metrics["wikitext.word_perplexity"] for r in children}
    parquet = pd.read_parquet(runs_csv.with_suffix(".parquet"))
    assert list(parquet.columns) == list(per_run.columns)
    for table in (parquet, per_run):
        assert dict(zip(table["run_id"], table["wikitext_word_ppl"])) == logged_ppl
    assert "data:image/png;base64," in csv.with_suffix(".html").read_text()
    # The report went back to the sweep's parent run.
    client, parents = _runs(tmp, "sweep")
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {f"report/{csv.stem}.{ext}" for ext in ("csv", "md", "parquet", "html")} <= logged
    assert f"report/{runs_csv.name}" in logged
    summary = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")}
    assert {"summary/summary.html", "summary/summary.parquet", "summary/summary-runs.csv"} <= summary


def test_relaunch_skips_finished_points(store):
    tmp, _ = store
    proc = _sweep(tmp, "again", "method=rtn,gptq", "bits=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The two points, and the baseline every sweep includes: the first sweep's fp16 run is reused.
    assert proc.stderr.count("already finished") == 3 and "[baseline] fp16" in proc.stderr
    _, children = _runs(tmp, "point")
    assert len(children) == 3  # nothing new was run
    _, parents = _runs(tmp, "sweep")
    newest = max(parents, key=lambda r: r.info.start_time)
    reused = [k for k in newest.data.tags if k.startswith("sweep.reused.")]
    assert len(reused) == 3


def test_failing_grid_point_is_recorded_and_the_others_finish(tmp_path, monkeypatch, embedded_model_dir):
    """Fault injection: RTN raises at bits=3; bits 2 and 4 must still finish."""
    from sweep.methods.rtn import RoundToNearest

    real = RoundToNearest.quantize

    def flaky(self, model, calibration, progress):
        if self.cfg.bits == 3:
            raise RuntimeError("injected fault")
        return real(self, model, calibration, progress)

    monkeypatch.setattr(RoundToNearest, "quantize", flaky)
    monkeypatch.chdir(REPO)
    fast = [o for o in FAST if not o.startswith(("bench.", "eval."))]
    monkeypatch.setattr(sys, "argv", ["sweep", *fast, "method=rtn", "bits=2,3,4", "eval=none", "bench=none",
                                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                      f"hydra.sweep.dir={tmp_path}/sweep", "-m"])
    from sweep.__main__ import app

    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        app()
    assert exit_info.value.code == 1  # the sweep says it was not clean
    client, children = _runs(tmp_path, "point")
    status = {r.data.params["bits"]: r for r in children}
    assert status["2"].info.status == "FINISHED" and status["4"].info.status == "FINISHED"
    failed = status["3"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error.class"] == "RuntimeError" and "injected fault" in failed.data.tags["error.message"]
    assert "error" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    _, parents = _runs(tmp_path, "sweep")
    assert parents[0].info.status == "FAILED"
