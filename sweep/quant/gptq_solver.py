"""GPTQ (Frantar et al., 2022) for one linear layer, in plain torch.

Given the layer's weight W (out × in) and H = 2/n Σ x xᵀ over calibration inputs, quantize the
columns of W one at a time and spread each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian (Optimal Brain Quantization), with lazy block updates.
Written from the paper's algorithm; runs on CPU and GPU alike, always in float32 (whatever dtype the
model runs in). Rows never interact: linears that share H (q/k/v, gate/up) can be solved stacked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from sweep.quant.gptq_columns import quantize_columns
from sweep.quant.grid import Grid, fit_grid


# bfloat16/float16 calibration inputs on a CPU are gathered into one Hessian product per this many rows.
HESSIAN_ROWS_PER_PRODUCT = 8192


class RowBuffer:
    """float32 storage for the half-precision rows a HessianAccumulator gathers before its product, handed
    from one accumulator to the next. A fresh block for each group's rows (50 MB for an 8,192 × 1,536
    MLP input) is mapped anew and faulted in page by page, which cost more than copying the rows into it;
    a reused block is already resident. One buffer serves one accumulator at a time."""

    def __init__(self) -> None:
        self._storage: Optional[torch.Tensor] = None

    def rows(self, count: int, features: int, keep: int, device: torch.device) -> torch.Tensor:
        """A contiguous (count × features) float32 matrix on `device` whose first `keep` rows are those of the
        previous call's matrix (same `features`); the others are unset."""
        needed = count * features
        storage = self._storage
        if storage is None or storage.numel() < needed or storage.device != torch.device(device):
            grown = torch.empty(max(needed, HESSIAN_ROWS_PER_PRODUCT * features), dtype=torch.float32, device=device)
            if keep:
                grown[:keep * features].copy_(storage[:keep * features])
            self._storage = storage = grown
        return storage[:needed].view(count, features)


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over every row of every input batch seen so far."""

    def __init__(self, in_features: int, device: torch.device, row_buffer: Optional[RowBuffer] = None):
        self._H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.nsamples = 0        # rows added; those in _H are nsamples - _pending
        self._rows = row_buffer if row_buffer is not None else RowBuffer()
        self._pending = 0        # half-precision rows gathered (as float32) in self._rows, not yet in _H

    @property
    def H(self) -> torch.Tensor:
        self._flush()
        return self._H

    def add(self, x: torch.Tensor) -> None:
        """Add one input: (tokens × features), or a batch (samples × tokens × features).

        float32 inputs are added sample by sample, so that a batched calibration pass accumulates exactly
        what one sample at a time would. bfloat16/float16 inputs on a CPU (a model run in bfloat16, whose
        products already round differently batched and one sample at a time) are gathered and summed as one
        float32 product per HESSIAN_ROWS_PER_PRODUCT rows, whatever the batching: the same sum in another
        order, several times faster on CPU than one product per 256-token sample."""
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
            rows = x.reshape(-1, x.shape[-1])
            gathered = self._rows.rows(self._pending + rows.shape[0], rows.shape[1], self._pending, x.device)
            gathered[self._pending:].copy_(rows)  # a float32 copy: the model may reuse its tensor
            self._pending += rows.shape[0]
            self.nsamples += rows.shape[0]
            if self._pending >= HESSIAN_ROWS_PER_PRODUCT:
                self._flush()
            return
        self._flush()
        for sample in (x if x.dim() >= 3 else [x]):
            self._add(sample.reshape(-1, sample.shape[-1]).float())

    def _flush(self) -> None:
        if not self._pending:
            return
        x = self._rows.rows(self._pending, self._H.shape[0], self._pending, self._H.device)
        self._H *= (self.nsamples - self._pending) / self.nsamples
        self._pending = 0
        self._H.add_(_gram(x), alpha=2.0 / self.nsamples)

    def _add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self._H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        self._H += x.t() @ x


def _gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx from its upper block triangle (column blocks of about a quarter of the width), mirrored: exactly
    symmetric, and about 20% faster on 2 CPU cores than the full product (which is not quite half the
    work here: the small diagonal-block products run below the full product's rate)."""
    features = x.shape[1]
    step = -(-features // blocks)
    gram = torch.empty(features, features, dtype=x.dtype, device=x.device)
    for i in range(0, features, step):
        gram[i:i + step, i:] = x[:, i:i + step].t() @ x[:, i:]
    return torch.triu(gram) + torch.triu(gram, 1).t()


@dataclass
class GPTQResult:
    weight: torch.Tensor          # quantize-dequantized weight, original column order
    row_losses: torch.Tensor      # per output row: Σ (w - q)² / Hinv_diag² / 2, the solver's proxy for the output error
    damp_retries: int             # how often the damping had to be raised to make H positive definite
    # Each group's grid in column order where groups are contiguous columns (no act-order), for packing.
    grids: Optional[List[Grid]] = None

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    damp_percent: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
) -> GPTQResult:
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    rows, cols = W.shape

    # Inputs that were always zero carry no information: fix their column to zero.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    per_channel: Optional[Grid] = fit_grid(W, bits, sym) if group_size == -1 else None
    grids: Optional[List[Grid]] = None if act_order else []
    # Static groups fix every group's grid up front (on the unpermuted weight) so act-order
    # does not scatter one group's grid across the matrix.
    static: Optional[list] = None
    if group_size != -1 and static_groups:
        static = [fit_grid(W[:, g:g + group_size], bits, sym) for g in range(0, cols, group_size)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv, retries = _upper_cholesky_of_inverse(H, damp_percent)

    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, device=W.device)
    grid = per_channel
    maxq = 2**bits - 1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # The block's columns in runs that share one grid, each run quantized by one call.
        i = 0
        while i < i2 - i1:
            col = i1 + i
            if group_size == -1:
                stop = i2 - i1
            elif static is not None:
                group = _static_group(col, perm, group_size)
                grid = static[group]
                stop = i + 1
                while stop < i2 - i1 and _static_group(i1 + stop, perm, group_size) == group:
                    stop += 1
            else:
                if col % group_size == 0:
                    # The grid sees the group as it is now, with the error already spread onto it.
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                    grid = fit_grid(ahead, bits, sym)
                    if grids is not None:
                        grids.append(grid)
                stop = min(i2 - i1, i + group_size - col % group_size)
            quantize_columns(W1, Q1, Err1, Hinv1, grid.scale, grid.zero, maxq, i, stop)
            i = stop
        Q[:, i1:i2] = Q1
        # Σ (w - q)² / d² / 2 over the block's columns, taken once per block instead of once per column.
        losses += Err1.pow(2).sum(dim=1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if grids is not None:
        grids = [per_channel] if per_channel is not None else static if static is not None else grids
    return GPTQResult(weight=Q, row_losses=losses, damp_retries=retries, grids=grids)


def packed_codes(result: GPTQResult, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [rows, cols] uint8, scales [rows, groups], zeros [rows, groups]) of a GPTQ result with
    contiguous groups: the integer codes behind `result.weight` (which is scale · (code − zero), so
    dividing back and rounding recovers each code exactly), for a packed kernel."""
    if not result.grids:
        raise ValueError("an act-order GPTQ result has no contiguous groups to pack")
    rows, cols = result.weight.shape
    size = cols if group_size == -1 else group_size
    codes = torch.cat([grid.quantize(result.weight[:, g * size:(g + 1) * size])
                       for g, grid in enumerate(result.grids)], dim=1)
    scales = torch.cat([grid.scale for grid in result.grids], dim=1)
    zeros = torch.cat([grid.zero.expand(rows, 1) for grid in result.grids], dim=1)
    return codes.to(torch.uint8), scales, zeros


def _static_group(col: int, perm: Optional[torch.Tensor], group_size: int) -> int:
    """The static group of (permuted) column col: the group of the column it was before act-order."""
    return (int(perm[col]) if perm is not None else col) // group_size


def _upper_cholesky_of_inverse(H: torch.Tensor, damp_percent: float, max_retries: int = 6):
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), raising λ tenfold until H is positive definite."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device)
    damp = damp_percent
    for attempt in range(max_retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), attempt
        damp *= 10
    raise torch.linalg.LinAlgError(
        f"Hessian is not positive definite even with damp_percent={damp:g}; use more calibration samples"
    )
