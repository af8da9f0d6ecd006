"""What this machine's CPU can do, and the thread settings sweep chooses for it.

- `cpu_has_bf16`: AVX-512 BF16 or AMX instructions, on which bfloat16 matmuls run several times
  faster than float32 (a 8192×576 @ 576×1536 matmul on the 2-core machines sweep is tested on:
  ~230 GFLOP/s fp32 vs ~2,300-2,500 GFLOP/s bf16 through AMX; benchmarks/cpu_sweep.py). `model.dtype=auto` picks bfloat16 on such CPUs.
- `configure_threads`: torch's intra-op threads = physical cores (hyper-threads share a core's
  matrix units, so more threads only add contention), one inter-op thread (sweep runs one model at
  a time), and no tokenizer thread pool beside them (HF tokenizers would otherwise spawn one per
  core and oversubscribe the cores torch is using). It is set for every job, whatever launched it:
  bfloat16 results on CPU depend on the thread count (a 2-bit model's LAMBADA perplexity on 20
  passages differed between 1 and 2 threads), and joblib's workers start with one thread each.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Dict

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 claimed
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def configure_threads() -> Dict[str, int]:
    """Set the thread counts for this process (before any parallel work); return them as tags."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cores = physical_cores()
    torch.set_num_threads(cores)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep what is there
        pass
    return {"threads.intra_op": torch.get_num_threads(), "threads.inter_op": torch.get_num_interop_threads(),
            "threads.physical_cores": cores}
