"""One 4-point sweep through three launchers and two kinds of store must give the same runs.

- Hydra's basic launcher (one process), logging to an `mlflow server` on 127.0.0.1 (SQLite backend);
- the gpus preset (joblib, 2 worker processes, a fake pool of 2 GPUs), logging to a SQLite file;
- submitit's local executor (one subprocess per grid point, as on SLURM), logging to a SQLite file.

Each store must hold one parent run and four finished children under it, with exactly the config
hashes the basic sweeper's grid gives, and identical quality numbers (RTN on CPU is deterministic).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from conftest import REPO, make_config
from sweep.infra import gpu_pool
from sweep.pipeline.identity import config_hash
from sweep.pipeline.objective import PENALTY

GRID = ["model=smollm2-135m-4l", "method=rtn", "bits=2,3,4,8", "eval.tasks=[lambada]", "eval.limit.lambada=4",
        "bench=none", "baseline=false"]
EXPERIMENT = "smollm2-135m-4l"


def _expected_hashes():
    return {config_hash(make_config(*[o if not o.startswith("bits=") else f"bits={b}" for o in GRID]), "cpu")
            for b in (2, 3, 4, 8)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep(tmp_path, name, uri, *extra, env=None):
    # A tracking server stores artifacts itself; a SQLite store needs a place for them.
    artifacts = [] if uri.startswith("http") else [f"tracking.artifact_location={tmp_path}/artifacts-{name}"]
    cmd = [sys.executable, "-m", "sweep", *GRID, *extra, f"tracking.uri={uri}", *artifacts,
           f"hydra.sweep.dir={tmp_path}/{name}", "-m"]
    # Output to a file: three sweeps run at once, and a full pipe nobody reads would stall one.
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_server(url: str, server: subprocess.Popen, log, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {open(log.name).read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow server at {url} did not answer /health within {timeout_s}s")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, embedded_model_dir):
    tmp = tmp_path_factory.mktemp("scale")
    port = _free_port()
    server_url = f"http://127.0.0.1:{port}"
    server_log = open(tmp / "server.log", "w")  # a file, not a pipe nobody reads while the sweeps run
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp}/server.db",
                               "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
                              cwd=tmp, stdout=server_log, stderr=subprocess.STDOUT,
                              # No background job runner (7 extra processes); its own session, to stop it whole.
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              start_new_session=True)
    try:
        # The two multi-process launchers start while the server boots.
        fake_gpus = {gpu_pool.ENV_COUNT: "2", gpu_pool.ENV_LOCK_DIR: str(tmp / "gpu-locks")}
        joblib = _sweep(tmp, "joblib", f"sqlite:///{tmp}/joblib.db", "hydra/launcher=gpus", env=fake_gpus)
        submitit = _sweep(tmp, "submitit", f"sqlite:///{tmp}/submitit.db", "hydra/launcher=submitit_local")
        _wait_for_server(server_url, server, server_log)
        basic = _sweep(tmp, "basic", server_url)
        procs = {"basic": basic, "joblib": joblib, "submitit": submitit}
        outputs = {}
        for name, proc in procs.items():
            proc.wait(timeout=900)
            outputs[name] = (tmp / f"{name}.log").read_text()
            assert proc.returncode == 0, f"{name}: {outputs[name][-4000:]}"
        yield {"basic": server_url, "joblib": f"sqlite:///{tmp}/joblib.db",
               "submitit": f"sqlite:///{tmp}/submitit.db"}, outputs
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(timeout=60)
        server_log.close()


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "point"]
    return parents, children


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit"])
def test_each_launcher_logs_the_same_four_runs_under_one_parent(stores, launcher):
    uris, _ = stores
    parents, children = _runs(uris[launcher])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    # Jobs in other processes found their parent run (through <sweep dir>/sweep.json).
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["sweep.config_hash"] for c in children} == _expected_hashes()


def test_launchers_agree_on_every_number(stores):
    uris, _ = stores
    quality = {}
    for launcher, uri in uris.items():
        _, children = _runs(uri)
        quality[launcher] = {c.data.tags["sweep.config_hash"]: c.data.metrics["lambada.perplexity"] for c in children}
    assert quality["joblib"] == quality["basic"] == quality["submitit"]


def test_tracking_server_holds_params_and_artifacts(stores):
    uris, _ = stores
    client = MlflowClient(uris["basic"])
    _, children = _runs(uris["basic"])
    run = children[0]
    assert run.data.params["model.num_layers"] == "4"
    # Artifacts went through the server's artifact proxy, not to a local path.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_gpu_pool_gives_each_joblib_worker_its_own_gpu(stores):
    _, output = stores
    claims = {}
    for line in output["joblib"].splitlines():
        if "gpu pool" in line and "holds GPU" in line:
            words = line.split()
            pid, gpu = words[words.index("process") + 1], words[words.index("GPU") + 1]
            claims.setdefault(gpu, set()).add(pid)
    assert claims, output["joblib"][-3000:]
    assert set(claims) <= {"0", "1"}
    assert all(len(pids) == 1 for pids in claims.values())  # never two worker processes on one GPU


def test_optuna_preset_prefers_the_point_within_the_memory_budget(tmp_path, monkeypatch, embedded_model_dir):
    """Two trials through the Optuna sweeper (grid sampler, so both run): 2-bit fits 118 MB, 8-bit does not."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [
        "sweep", "+experiment=optuna_budget", "hydra/sweeper/sampler=grid", "model=smollm2-135m-4l", "method=rtn",
        "model.dtype=float32",   # the budget below sits between the float32 model's 2-bit and 8-bit sizes
        "eval.tasks=[lambada]", "eval.limit.lambada=4", "bench=none", "objective.metric=lambada.perplexity",
        "objective.memory_budget_mb=118", "hydra.sweeper.params.method='choice(rtn)'",
        "hydra.sweeper.params.bits='choice(2,8)'", "hydra.sweeper.params.group_size='choice(128)'",
        "hydra.sweeper.params.damp_percent='choice(0.01)'", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/artifacts",
        f"hydra.sweep.dir={tmp_path}/optuna", "-m"])
    from sweep.__main__ import app

    GlobalHydra.instance().clear()
    app()
    result = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    _, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    # A search includes the baseline too (run once, before the first trial), beside its trials.
    assert [r.data.tags["method"] for r in children].count("fp16") == 1
    by_bits = {r.data.params["bits"]: r for r in children if r.data.tags["method"] == "rtn"}
    assert set(by_bits) == {"2", "8"}
    assert by_bits["8"].data.metrics["memory.packed_weights_mb"] > 118 >= by_bits["2"].data.metrics["memory.packed_weights_mb"]
    assert result["best_params"]["bits"] == 2
    assert result["best_value"] == pytest.approx(by_bits["2"].data.metrics["lambada.perplexity"])
    assert result["best_value"] < PENALTY


def test_objective_penalises_over_budget_and_failed_points():
    from sweep.config.schema import ObjectiveConfig
    from sweep.pipeline.objective import FAILED, objective

    cfg = ObjectiveConfig(metric="wikitext.word_perplexity", memory_budget_mb=150.0)
    fits = {"wikitext.word_perplexity": 120.0, "memory.packed_weights_mb": 148.0}
    assert objective(cfg, "FINISHED", fits) == 120.0
    assert objective(cfg, "SKIPPED", fits) == 120.0  # a resumed point keeps its measured value
    slightly_over = objective(cfg, "FINISHED", {"wikitext.word_perplexity": 50.0, "memory.packed_weights_mb": 160.0})
    far_over = objective(cfg, "FINISHED", {"wikitext.word_perplexity": 40.0, "memory.packed_weights_mb": 500.0})
    assert 120.0 < PENALTY <= slightly_over < far_over < FAILED  # worse than any fit, ranked by how far over
    assert objective(cfg, "FAILED", {}) == FAILED
    assert objective(cfg, "FINISHED", {"memory.packed_weights_mb": 100.0}) == FAILED  # metric missing (eval=none)
    assert objective(cfg, "FINISHED", {"wikitext.word_perplexity": float("nan"), "memory.packed_weights_mb": 1.0}) == FAILED


def test_ray_launcher_logs_the_same_runs(tmp_path, embedded_model_dir):
    """Runs only where the optional `.[ray]` extra is installed (not in CI: docs/scaling.md#ray)."""
    try:
        import hydra_plugins.hydra_ray_launcher  # noqa: F401
    except ImportError:
        pytest.skip("hydra-ray-launcher is not installed (optional extra .[ray], kept out of .[test]: "
                    "it pins cloudpickle<3 and starts a local Ray cluster)")
    uri = f"sqlite:///{tmp_path}/ray.db"
    proc = _sweep(tmp_path, "ray", uri, "hydra/launcher=ray_gpus")
    proc.wait(timeout=900)
    assert proc.returncode == 0, (tmp_path / "ray.log").read_text()[-4000:]
    parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["sweep.config_hash"] for c in children} == _expected_hashes()


def test_slurm_preset_asks_for_one_gpu_per_task_a_time_limit_and_an_array_throttle(tmp_path):
    """What sbatch would get, rendered by submitit from conf/hydra/launcher/slurm.yaml (no cluster needed)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # The plugin passes these to submitit's SlurmExecutor under the same names (time is timeout_min).
    keys = ("partition", "gpus_per_task", "cpus_per_task", "array_parallelism")
    script = _make_sbatch_string(command="python -m sweep", folder=str(tmp_path), map_count=12,
                                 time=launcher["timeout_min"], mem=f"{launcher['mem_gb']}GB",
                                 ntasks_per_node=launcher["tasks_per_node"], nodes=launcher["nodes"],
                                 **{k: launcher[k] for k in keys})
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --time=240",
                 "#SBATCH --array=0-11%8", "#SBATCH --ntasks-per-node=1"):
        assert line in script, script
