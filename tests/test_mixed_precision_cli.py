"""The mixed-precision workflow through the real CLI on the 4-layer model: sensitivity sweep →
allocation under a budget → the allocation as a grid point beside a uniform one → report with
the heat-map → recommendation whose command reproduces the run's config."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, make_config
from sweep import allocate, report
from sweep.pipeline.identity import config_hash

EXPERIMENT = "smollm2-135m-4l"


def _store(tmp):
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts"]


def _sweep(tmp, name, *args):
    cmd = [sys.executable, "-m", "sweep", *args, "model=smollm2-135m-4l", *_store(tmp), f"hydra.sweep.dir={tmp}/{name}", "-m"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, embedded_model_dir):
    tmp = tmp_path_factory.mktemp("mixed")
    _sweep(tmp, "sensitivity", "+experiment=sensitivity", "method.probe_tokens=48", "method.probe_seqlen=48")
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert allocate.main(["--budget-bits", "4.3", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                          "--conf-dir", str(tmp / "conf"), "--name", "alloc"]) == 0
    _sweep(tmp, "grid", "--config-dir", str(tmp / "conf"), "method=rtn", "+layer_bits=none,alloc", "bench=none",
           "eval.tasks=[wikitext]", "eval.limit.wikitext=1")
    return tmp, uri


def test_sensitivity_run_logs_a_table_per_layer_group(workflow):
    tmp, uri = workflow
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.method = 'sensitivity'")
    metrics = run.data.metrics
    assert metrics["sensitivity.groups"] == 9  # 4 layers × {attn, mlp} + lm_head
    assert {f"sensitivity.layers.{i}.{b}.delta_ppl" for i in range(4) for b in ("attn", "mlp")} <= set(metrics)
    assert metrics["sensitivity.baseline_ppl"] > 1 and "sensitivity.lm_head.delta_ppl" in metrics
    assert "sensitivity.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_allocation_runs_beside_uniform_and_shows_in_report(workflow, capsys):
    tmp, uri = workflow
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp / "report")]) == 0
    df = pd.read_csv(next(p for p in (tmp / "report").glob("sweep-*.csv") if not p.stem.endswith("-runs")))
    df = df[df["method"] != "fp16"]  # the sweep's baseline, added to every sweep
    assert sorted(df["layer_bits"]) == ["mixed", "uniform"]
    mixed, uniform = (df[df["layer_bits"] == k].iloc[0] for k in ("mixed", "uniform"))
    assert mixed["avg_bits"] <= 4.3 and uniform["avg_bits"] == pytest.approx(4 + 5 * 16 / 576 * 4 / 6 + 12 * 16 / 1536 * 2 / 6, rel=0.02)
    assert mixed["weight_mb"] != uniform["weight_mb"] and mixed["runs"] == 1
    pngs = list((tmp / "report").glob("sensitivity-*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The HTML page shows the heat-map beside the uniform-vs-mixed rows.
    page = next((tmp / "report").glob("sweep-*.html")).read_text()
    assert "Per-layer sensitivity" in page and page.count("data:image/png;base64,") >= 3


def test_recommendation_prints_the_best_run_and_a_command_that_reproduces_it(workflow, capsys):
    tmp, uri = workflow
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    points = [r for r in client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'point'")
              if "wikitext.word_perplexity" in r.data.metrics]
    best = min(points, key=lambda r: r.data.metrics["wikitext.word_perplexity"])
    budget = max(r.data.metrics["memory.packed_weights_mb"] for r in points) + 1
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--recommend", "--budget-mb", str(budget)]) == 0
    out = capsys.readouterr().out
    assert best.info.run_id in out
    command = out.split("reproduce with:")[1].strip()
    args = shlex.split(command)[3:]  # after "python -m sweep"
    assert config_hash(make_config(*args), "cpu") == best.data.tags["sweep.config_hash"], command
    # A budget below every run finds nothing, and says so.
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--recommend", "--budget-mb", "1"]) == 1
