"""Bit-reproducible runs: torch's deterministic algorithms, and a record of any op that could not be.

`deterministic()` turns on `torch.use_deterministic_algorithms` in warn-only mode around the phases
whose numbers must reproduce (calibration, quantization, evaluation) and records every op that
warned it has no deterministic implementation: the run tags them (`deterministic=false`,
`deterministic.ops`). On CUDA, cuBLAS is deterministic only with a fixed workspace
(`CUBLAS_WORKSPACE_CONFIG`), which must be set before CUDA starts: `python -m sweep` sets it at
import. Latency is measured outside this mode: it needs speed, not bit-identical numbers.
"""
from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from typing import Iterator, List

import torch

CUBLAS_WORKSPACE = ":4096:8"
_NONDETERMINISTIC = re.compile(r"^(.*?) does not have a deterministic implementation")


def set_cublas_workspace() -> None:
    """Fix cuBLAS's workspace so its GEMMs reduce in a fixed order (before any CUDA call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic() -> Iterator[List[str]]:
    """Deterministic algorithms inside the block; yields the list it fills with the ops that were not."""
    seen: List[str] = []
    was, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        for w in caught:
            match = _NONDETERMINISTIC.match(str(w.message))
            if match and match.group(1) not in seen:
                seen.append(match.group(1))
            elif not match:  # not ours: show it as it would have been shown
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)
        torch.backends.cudnn.benchmark = benchmark
