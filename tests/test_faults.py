"""Fault injection: real signals to real sweep processes, concurrent writers, corrupted caches, NaN metrics.

Each test breaks something on purpose and then reads the MLflow store (or the cache) back to check
that nothing finished was lost and that the store says what happened. docs/reliability.md lists
these faults and what each keeps.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, make_config
from sweep.analysis.table import build_table

EXPERIMENT = "smollm2-135m-4l"
SMALL = ["model=smollm2-135m-4l", "method=rtn", "eval=none", "bench=none", "baseline=false"]


def _store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _launch(tmp_path, *args):
    cmd = [sys.executable, "-m", "sweep", *SMALL, *args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/sweep", "-m"]
    return cmd


def _start_and_signal(cmd, sig, point: str) -> subprocess.CompletedProcess:
    """Start a sweep, send `sig` as soon as grid point `point` ("[2/2]") has opened its run, wait for the end."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if point in line and "MLflow run" in line:
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert any("MLflow run" in s for s in seen), stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)


def test_killed_sweep_leaves_a_consistent_store_and_resumes(tmp_path, embedded_model_dir):
    """SIGKILL in point 1, then SIGTERM in point 2, then a clean relaunch of the same 2-point sweep."""
    cmd = _launch(tmp_path, "bits=2,3")

    # 1. SIGKILL: the process cannot react; its runs stay RUNNING until a relaunch looks at them.
    _start_and_signal(cmd, signal.SIGKILL, "[1/2]")
    _, runs = _store(tmp_path)
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]  # the parent and point 1
    killed_by_sigkill = next(r.info.run_id for r in runs if r.data.tags["sweep.role"] == "point")
    # The report, read on this host, counts it as killed already: its process is gone.
    table = build_table([r for r in runs if r.info.run_id == killed_by_sigkill])
    assert table["status"].tolist() == ["KILLED"]

    # 2. Relaunch; point 1 finishes, then SIGTERM (what schedulers send) arrives during point 2.
    term = _start_and_signal(cmd, signal.SIGTERM, "[2/2]")
    assert term.returncode != 0
    assert "lost its process earlier; marked KILLED" in term.stderr
    client, runs = _store(tmp_path)
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    parent = next(r for r in runs if r.data.tags["sweep.role"] == "sweep")
    assert parent.info.status == "KILLED" and parent.data.tags["sweep.interrupted"] == "true"
    points = {r.info.run_id: r for r in runs if r.data.tags["sweep.role"] == "point"}
    assert points[killed_by_sigkill].info.status == "KILLED"
    assert points[killed_by_sigkill].data.tags["error.class"] == "ProcessGone"
    by_status = {(r.data.params["bits"], r.info.status): r for i, r in points.items() if i != killed_by_sigkill}
    assert set(by_status) == {("2", "FINISHED"), ("3", "KILLED")}
    terminated = by_status["3", "KILLED"]
    assert terminated.data.tags["error.class"] == "KeyboardInterrupt"
    assert "error" in {a.path for a in client.list_artifacts(terminated.info.run_id)}

    # 3. Relaunch: the finished point is skipped, the killed one runs; killed attempts stay as KILLED.
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("already finished") == 1
    assert "2 finished, 0 failed" in done.stderr
    _, runs = _store(tmp_path)
    points = [r for r in runs if r.data.tags["sweep.role"] == "point"]
    assert {r.data.params["bits"] for r in points if r.info.status == "FINISHED"} == {"2", "3"}
    assert sorted(r.info.status for r in points) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    (parent,) = [r for r in runs if r.data.tags["sweep.role"] == "sweep"]
    assert parent.info.status == "FINISHED"  # the same sweep directory keeps its parent run
    assert parent.data.tags["sweep.interrupted"] == "false"


WRITER = textwrap.dedent("""
    import sys
    from sweep.config.schema import TrackingConfig
    from sweep.tracking.tracker import Tracker
    uri, writer = sys.argv[1], sys.argv[2]
    tracker = Tracker(TrackingConfig(uri=uri), "concurrent")
    for i in range(5):
        run = tracker.create_run(f"w{writer}-{i}", {"sweep.role": "point", "writer": writer})
        tracker.log_params(run, {f"p{j}": j for j in range(20)})
        tracker.log_metrics(run, {f"m{j}": float(j) for j in range(10)})
        tracker.set_tags(run, {"step": i})
        tracker.finish(run)
""")


def test_four_concurrent_writers_to_one_fresh_sqlite_store_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # does not exist yet: the four race to create it too
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(w)], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(e[-2000:] for e in errors)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id], max_results=100)
    assert len(runs) == 20
    assert all(r.info.status == "FINISHED" and len(r.data.params) == 20 and len(r.data.metrics) == 10 for r in runs)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{w}-{i}" for w in range(4) for i in range(5))


def test_locked_store_calls_are_retried_not_lost(monkeypatch):
    from mlflow.exceptions import MlflowException

    from sweep.tracking import store

    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    calls = []

    def flaky_write(x):
        calls.append(x)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert store.retry_locked(flaky_write)(21) == 42 and len(calls) == 3

    def broken(x):
        raise MlflowException("no such table: runs")

    with pytest.raises(MlflowException, match="no such table"):  # other errors are not retried
        store.retry_locked(broken)(1)


def test_corrupted_cache_entries_are_detected_and_rebuilt(tmp_path, embedded_model_dir):
    from transformers import AutoTokenizer

    from sweep.data import calibration
    from sweep.data.tasks import write_task_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    cal = make_config("calibration.nsamples=3", "calibration.seqlen=32").calibration
    first = calibration.cached_samples(tokenizer, cal, tmp_path)
    expected = calibration.build_samples(tokenizer, cal)
    assert all((a == b).all() for a, b in zip(first, expected))
    (entry,) = (tmp_path / "calibration").glob("*.safetensors")

    data = bytearray(entry.read_bytes())
    data[-8:] = b"\xff" * 8  # flip the last token ids: still a loadable file, but wrong
    entry.write_bytes(bytes(data))
    again = calibration.cached_samples(tokenizer, cal, tmp_path)
    assert all((a == b).all() for a, b in zip(again, expected))

    entry.write_bytes(b"")  # a write that never happened
    assert all((a == b).all() for a, b in zip(calibration.cached_samples(tokenizer, cal, tmp_path), expected))

    other = make_config("calibration.nsamples=3", "calibration.seqlen=32", "calibration.seed=1").calibration
    calibration.cached_samples(tokenizer, other, tmp_path)
    assert len(list((tmp_path / "calibration").glob("*.safetensors"))) == 2  # keyed by its inputs

    tasks = write_task_dir(tmp_path / "tasks")
    docs = tasks / "data" / "wikitext-2-raw-v1.test.docs.jsonl"
    intact = docs.read_bytes()
    docs.write_bytes(intact[: len(intact) // 2])  # a truncated copy would silently score half the test set
    write_task_dir(tmp_path / "tasks")
    assert docs.read_bytes() == intact


def test_nonfinite_metrics_get_a_status_tag_not_a_number(tmp_path, monkeypatch, embedded_model_dir):
    import sweep.pipeline.run as run_module
    from sweep.pipeline.run import run_point

    def nan_eval(model, tokenizer, cfg, cache, seed=0):
        return {"wikitext.word_perplexity": math.nan, "lambada.perplexity": math.inf, "lambada.acc": 0.5}, {}, {}

    monkeypatch.setattr(run_module, "evaluate", nan_eval)
    cfg = make_config("model=smollm2-135m-4l", "method=fp16", "bench=none", "eval.limit.lambada=1",
                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/a")
    result = run_point(cfg)
    assert result.status == "FINISHED"
    client, (run,) = _store(tmp_path)
    assert run.data.tags["status.nonfinite_metrics"] == "lambada.perplexity,wikitext.word_perplexity"
    assert "wikitext.word_perplexity" not in run.data.metrics and "lambada.perplexity" not in run.data.metrics
    assert run.data.metrics["lambada.acc"] == 0.5


def test_task_folder_is_never_rewritten_in_place(tmp_path):
    # Parallel grid points (hydra/launcher=gpus) share the lm-eval task folder while lm-eval scans it;
    # a rewrite in place let one worker read an empty task YAML ("sweep_lambada is not a registered task").
    from sweep.data.tasks import TASK_DIR, write_task_dir

    target = write_task_dir(tmp_path / "tasks")
    files = sorted(p.name for p in TASK_DIR.glob("*.yaml")) + ["utils.py"]
    before = {name: (target / name).stat().st_ino for name in files}
    (target / "utils.py").write_text("# stale\n")           # a changed file is replaced whole (new inode)
    write_task_dir(tmp_path / "tasks")
    after = {name: (target / name).stat().st_ino for name in files}
    assert {n for n in files if before[n] != after[n]} == {"utils.py"}
    assert (target / "utils.py").read_text() == (TASK_DIR / "utils.py").read_text()
    assert not list(target.glob(".*.tmp"))
