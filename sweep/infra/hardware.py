"""What this machine's CPU can do, and the thread settings sweep chooses for it.

- `cpu_has_bf16`: AVX-512 BF16 or AMX instructions, on which bfloat16 matmuls run faster than float32
  (a 8192×576 @ 576×1536 matmul on the 2-core machines sweep is tested on, benchmarks/cpu_sweep.py:
  ~230 GFLOP/s fp32 vs ~2,300-2,500 bf16 on an Intel Xeon with AMX; ~155-190 fp32 vs ~420 bf16 on an
  AMD EPYC with AVX-512 BF16 and no AMX). `model.dtype=auto` picks bfloat16 on such CPUs.
- `cpu_model`, `bf16_instructions`: which CPU ran a job and which of those instructions it has (run
  tags `host.cpu`, `cpu.bf16_instructions`): the same 2-core machine type has been either CPU, and
  a bfloat16 run's speed differs about fivefold between them.
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


def first_processor(cpuinfo: str) -> Dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text ("flags", "model name", "cpu family", ...)."""
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: a VM's cores are alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def _cpuinfo() -> Dict[str, str]:
    try:
        return first_processor(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags known, so no bf16 claimed
        return {}


def cpu_flags() -> frozenset:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_has_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def bf16_instructions(flags: frozenset | None = None) -> str:
    """The bfloat16 matrix instructions the cores have ("amx_bf16,avx512_bf16", "avx512_bf16", "none")."""
    flags = cpu_flags() if flags is None else flags
    return ",".join(flag for flag in sorted(BF16_FLAGS) if flag in flags) or "none"


def cpu_model(fields: Dict[str, str] | None = None) -> str:
    """The CPU's model name with its family and model ("AMD EPYC (family 25, model 17)": a VM may show only
    the vendor's line, and the family and model still tell the generation); elsewhere what `platform` knows
    (often only the architecture)."""
    import platform

    fields = _cpuinfo() if fields is None else fields
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


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
