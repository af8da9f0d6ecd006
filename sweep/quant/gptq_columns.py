"""GPTQ's inner loop: quantize a run of columns of one block that share a grid, spreading each column's
error onto the block's columns to its right.

This loop is sequential in the columns (each column's value depends on every earlier column's error),
so it runs as one small operation per column: ~100 µs of dispatch per column in torch on a CPU, ~10 s
of a default CPU point. Rows never interact, so on a CPU it runs as compiled code instead, one row at a
time across the cores (numba, `columns_numba`), doing the same float32 operations in the same order as
the torch version (`columns_torch`, used on GPUs and wherever numba is missing): both give the same bits
(tests/test_quant.py checks it).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch

log = logging.getLogger(__name__)


def quantize_columns(W1: torch.Tensor, Q1: torch.Tensor, Err1: torch.Tensor, Hinv1: torch.Tensor,
                     scale: torch.Tensor, zero: torch.Tensor, maxq: int, start: int, stop: int) -> None:
    """Columns start..stop-1 of the block W1 (rows × block, float32), in place.

    For each column i: Q1[:, i] = scale * (clamp(round(w / scale + zero), 0, maxq) - zero) (Grid.qdq),
    Err1[:, i] = (w - q) / Hinv1[i, i], and W1[:, j] -= Err1[:, i] * Hinv1[i, j] for every j > i of the
    block. scale and zero hold one value per row."""
    kernel = _numba_kernel() if W1.device.type == "cpu" else None
    if kernel is None:
        columns_torch(W1, Q1, Err1, Hinv1, scale, zero, maxq, start, stop)
        return
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    kernel(W1.numpy(), Q1.numpy(), Err1.numpy(), Hinv1.contiguous().numpy(),
           scale.reshape(-1).contiguous().numpy(), zero.reshape(-1).contiguous().numpy(), float(maxq), start, stop)


def columns_torch(W1, Q1, Err1, Hinv1, scale, zero, maxq: int, start: int, stop: int) -> None:
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    for i in range(start, stop):
        w = W1[:, i:i + 1]
        q = scale * (torch.clamp(torch.round(w / scale + zero), 0, maxq) - zero)
        err = (w - q) / Hinv1[i, i]
        Q1[:, i:i + 1] = q
        Err1[:, i:i + 1] = err
        W1[:, i + 1:] -= err * Hinv1[i:i + 1, i + 1:]


@lru_cache(maxsize=1)
def _numba_kernel():
    try:
        import numba
        import numpy as np
    except ImportError:  # a dependency in pyproject; missing only where installed without deps (GPU machine)
        log.info("numba is not installed: GPTQ's column loop runs as torch operations (slower on CPU)")
        return None

    # float32 throughout, as torch computes it: every constant is a float32, and no fastmath, so LLVM
    # neither reassociates nor fuses a*b-c into an FMA (either would change the bits). The update loop
    # runs over unsigned indices: with signed ones numba's negative-index wraparound keeps LLVM from
    # vectorising it (5x slower).
    @numba.njit(parallel=True, cache=True, fastmath=False)
    def columns_numba(W1, Q1, Err1, Hinv1, scale, zero, maxq, start, stop):
        rows, width = W1.shape
        lo, hi = np.float32(0.0), np.float32(maxq)
        for r in numba.prange(rows):
            w_row, q_row, err_row = W1[r], Q1[r], Err1[r]
            s, z = scale[r], zero[r]
            for i in range(start, stop):
                h_row = Hinv1[i]
                w = w_row[i]
                code = np.rint(w / s + z)          # round half to even, like torch.round
                if code < lo:
                    code = lo
                elif code > hi:
                    code = hi
                q = s * (code - z)
                err = (w - q) / h_row[i]
                q_row[i] = q
                err_row[i] = err
                for j in range(numba.uint64(i + 1), numba.uint64(width)):
                    w_row[j] = w_row[j] - err * h_row[j]

    return columns_numba
