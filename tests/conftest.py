"""Shared fixtures. The embedded model is fetched and converted once per cache ($SWEEP_CACHE)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sweep.config.schema import SweepConfig, register_configs
from sweep.infra.hardware import cpu_has_bf16
from sweep.validation.fields import to_sweep_config

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
register_configs()

# The dtypes a CPU test runs the model in: float32 always, bfloat16 where the cores have it.
CPU_DTYPES = ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])


def make_config(*overrides: str) -> SweepConfig:
    """The validated SweepConfig that `python -m sweep <overrides>` would run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_sweep_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from sweep.models.embedded import embedded_model_dir as ensure

    return ensure("smollm2-135m-instruct", os.environ.get("SWEEP_CACHE", "~/.cache/sweep"))


# A small real sweep (4-layer model, tiny eval) into a temporary MLflow store, shared by the
# end-to-end, report and browser tests. Latency is timed (and samples generated) over 8 new tokens, not
# the quick bench's 32: what these tests check is that it is measured and logged, not its value.
EXPERIMENT = "smollm2-135m-4l"
FAST = ["model=smollm2-135m-4l", "eval.limit.wikitext=1", "eval.limit.lambada=20", "bench.repeats=1",
        "bench.max_new_tokens=8", "calibration.nsamples=4", "calibration.seqlen=64"]


def run_sweep(tmp_path, name, *args):
    cmd = [sys.executable, "-m", "sweep", *FAST, *args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/{name}", "-m"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def run_report(tmp_path, out, *args) -> subprocess.CompletedProcess:
    """`python -m sweep.report --experiment EXPERIMENT` on a test store, called in this process (its stdout
    captured): the same main() without a fresh interpreter's imports. test_sweep_e2e runs the real CLI."""
    from sweep import report

    argv = ["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out), *args]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = report.main(argv)
    return subprocess.CompletedProcess(["python", "-m", "sweep.report", *argv], code, printed.getvalue(), "")


@pytest.fixture(scope="session")
def store(tmp_path_factory, embedded_model_dir):
    """(store folder, the CompletedProcess) of `python -m sweep method=fp16,rtn,gptq bits=4 -m`."""
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_sweep(tmp, "first", "method=fp16,rtn,gptq", "bits=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, proc
