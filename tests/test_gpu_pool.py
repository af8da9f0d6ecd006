"""The GPU pool on a CPU machine: fake GPU counts, real processes, real OS file locks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from sweep.infra import gpu_pool

# A holder: claims a GPU for its process, reports it, and keeps it until its stdin closes.
HOLDER = """
import os, sys
from sweep.infra.gpu_pool import assign_process_gpu
gpu = assign_process_gpu()
print(gpu, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
sys.stdin.read()
"""
# A prober: which GPU it could claim right now ("None" when every one is held).
PROBE = """
from sweep.infra.gpu_pool import lock_dir, try_claim, visible_gpus
held = try_claim(visible_gpus(), lock_dir())
print(held.gpu if held else None, flush=True)
"""


def _env(tmp_path, count):
    return {**os.environ, "PYTHONPATH": str(REPO), gpu_pool.ENV_COUNT: str(count),
            gpu_pool.ENV_LOCK_DIR: str(tmp_path / "locks")}


def _start_holder(env):
    return subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _probe(env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_concurrent_claims_get_distinct_gpus_and_a_killed_holder_frees_its_gpu(tmp_path):
    env = _env(tmp_path, 3)
    holders = [_start_holder(env) for _ in range(3)]  # all three race for the pool at once
    try:
        claims = {}
        for proc in holders:
            line = proc.stdout.readline().split()
            assert line, proc.stderr.read()
            gpu, visible = line
            assert visible == gpu  # CUDA_VISIBLE_DEVICES pins the process to its GPU
            claims[gpu] = proc
        assert sorted(claims) == ["0", "1", "2"]  # no two processes hold the same GPU
        assert _probe(env) == "None"               # the pool is full while they live

        victim = claims["1"]
        victim.send_signal(signal.SIGKILL)         # a crashed job: no clean-up code runs
        victim.wait(timeout=60)
        assert _probe(env) == "1"                  # the OS dropped its lock with the process
    finally:
        for proc in holders:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=60)


def test_no_gpu_degrades_to_cpu_with_a_log_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(gpu_pool.ENV_COUNT, "0")
    monkeypatch.setenv(gpu_pool.ENV_LOCK_DIR, str(tmp_path))
    monkeypatch.setattr(gpu_pool, "_process_claim", None)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert gpu_pool.assign_process_gpu() is None
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    err = capsys.readouterr().err
    assert "no GPU visible" in err and "runs on CPU" in err
    assert gpu_pool.default_jobs() == 1  # the gpus launcher runs one job at a time on CPU


@pytest.mark.parametrize("visible, expected", [("2,3", ["2", "3"]), ("", []), ("-1", []), ("1,-1,2", ["1"]),
                                                ("GPU-8c2a,GPU-11f0", ["GPU-8c2a", "GPU-11f0"])])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.delenv(gpu_pool.ENV_COUNT, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_pool.visible_gpus() == expected


def test_a_bad_fake_count_names_the_variable(monkeypatch):
    monkeypatch.setenv(gpu_pool.ENV_COUNT, "two")
    with pytest.raises(ValueError, match="SWEEP_GPU_COUNT='two'"):
        gpu_pool.visible_gpus()


def test_claim_gives_up_after_its_timeout_when_the_pool_is_full(tmp_path):
    first = gpu_pool.try_claim(["0"], tmp_path)
    assert first is not None and first.gpu == "0"
    # A second lock on the same file, even in this process, must not get it (flock is per open file).
    assert gpu_pool.claim(["0"], tmp_path, timeout=0, poll_s=0) is None
    first.lock.release()
    again = gpu_pool.claim(["0"], tmp_path, timeout=0, poll_s=0)
    assert again is not None and again.gpu == "0"
