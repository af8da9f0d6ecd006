"""One GPU per job process, claimed from a pool of file locks.

`conf/hydra/launcher/gpus.yaml` runs grid points in parallel through the Hydra joblib launcher.
Its worker processes live for the whole sweep and run several grid points each, and CUDA reads
`CUDA_VISIBLE_DEVICES` once, when it initialises. So a GPU belongs to a *process*, not a job:
the first job a worker runs claims a free GPU (an exclusive lock on
`<lock dir>/gpu-<id>.lock`), sets `CUDA_VISIBLE_DEVICES` to it, and the worker keeps it.

The lock is an OS file lock (flock): it dies with the process that holds it, so a worker that
crashes or is killed frees its GPU for the worker that replaces it; no job index arithmetic,
no stale bookkeeping. Sweeps running side by side on one machine share the pool (same lock dir)
and never put two jobs on one GPU.

Environment:
  SWEEP_GPU_COUNT     pretend the machine has this many GPUs (0 forces CPU); for tests and to
                      use fewer GPUs than there are
  SWEEP_GPU_LOCK_DIR  where the lock files live (default: <tmp>/sweep-gpu-locks-<user>)
"""
from __future__ import annotations

import getpass
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.console import Console

log = logging.getLogger(__name__)

ENV_COUNT = "SWEEP_GPU_COUNT"
ENV_LOCK_DIR = "SWEEP_GPU_LOCK_DIR"
RESOLVER = "sweep_gpu_count"


@dataclass
class Claim:
    gpu: str          # the id as CUDA_VISIBLE_DEVICES names it (an index or a GPU-/MIG- UUID)
    lock: FileLock    # held while this object lives; released by the OS if the process dies


def visible_gpus() -> List[str]:
    """Ids of the GPUs jobs may use: $SWEEP_GPU_COUNT, else $CUDA_VISIBLE_DEVICES, else all CUDA devices."""
    fake = os.environ.get(ENV_COUNT, "").strip()
    if fake:
        if not fake.isdigit():
            raise ValueError(f"{ENV_COUNT}={fake!r} is not allowed: a whole number of GPUs, 0 or more")
        return [str(i) for i in range(int(fake))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
        return ids[:ids.index("-1")] if "-1" in ids else ids
    try:
        import torch
    except ImportError:
        return []
    # device_count() asks NVML, so this process does not initialise CUDA here.
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_count() -> int:
    return len(visible_gpus())


def default_jobs() -> int:
    """Parallel jobs for the gpus launcher: one per GPU, and one (sequential, on CPU) without GPUs."""
    return max(1, gpu_count())


def lock_dir() -> Path:
    configured = os.environ.get(ENV_LOCK_DIR)
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"sweep-gpu-locks-{getpass.getuser()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _lock_path(directory: Path, gpu: str) -> Path:
    return directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def try_claim(gpus: List[str], directory: Path) -> Optional[Claim]:
    """The first free GPU of `gpus`, locked for this process; None if every one is held."""
    for gpu in gpus:
        lock = FileLock(str(_lock_path(directory, gpu)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return Claim(gpu, lock)
    return None


def claim(gpus: List[str], directory: Path, timeout: Optional[float] = None, poll_s: float = 2.0) -> Optional[Claim]:
    """Wait for a free GPU (forever when `timeout` is None); None if none freed up in time."""
    start = time.monotonic()
    waiting_said = False
    while True:
        held = try_claim(gpus, directory)
        if held is not None or (timeout is not None and time.monotonic() - start >= timeout):
            return held
        if not waiting_said:
            _say(f"all {len(gpus)} GPUs ({','.join(gpus)}) are held by other jobs; waiting for one to free up")
            waiting_said = True
        time.sleep(poll_s)


_process_claim: Optional[Claim] = None


def assign_process_gpu() -> Optional[str]:
    """Pin this process to one free GPU (once; later calls return the same one). None: run on CPU."""
    global _process_claim
    if _process_claim is not None:
        return _process_claim.gpu
    gpus = visible_gpus()
    if not gpus:
        _say(f"no GPU visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, "
             f"{ENV_COUNT}={os.environ.get(ENV_COUNT, 'unset')}); this job runs on CPU")
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("gpu pool: CUDA is already initialised in this process, so CUDA_VISIBLE_DEVICES "
                           "can no longer choose its GPU; claim the GPU before any CUDA call")
    directory = lock_dir()
    _process_claim = claim(gpus, directory)
    assert _process_claim is not None
    # Indices in CUDA_VISIBLE_DEVICES follow nvidia-smi's order only with PCI bus order.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = _process_claim.gpu
    _say(f"process {os.getpid()} holds GPU {_process_claim.gpu} of {','.join(gpus)} "
         f"(CUDA_VISIBLE_DEVICES={_process_claim.gpu}; lock {_lock_path(directory, _process_claim.gpu)})")
    return _process_claim.gpu


def _say(message: str) -> None:
    # On the console (which shows only sweep's own lines) and in the job's log file.
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold]gpu pool[/bold]: {message}")
    log.info("gpu pool: %s", message)


class GpuPoolCallback(Callback):
    """Hydra callback (added by conf/hydra/launcher/gpus.yaml): each job process claims its GPU first."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        assign_process_gpu()


def gpus_per_job() -> int:
    """GPUs to ask a scheduler (Ray) for per job: 1 with a GPU, 0 without, so CPU machines still run."""
    return 1 if gpu_count() else 0


def register_resolver() -> None:
    """`${sweep_gpu_count:}` (jobs at once: one per GPU, at least 1) and `${sweep_gpus_per_job:}` in configs."""
    OmegaConf.register_new_resolver(RESOLVER, default_jobs, replace=True)
    OmegaConf.register_new_resolver("sweep_gpus_per_job", gpus_per_job, replace=True)
