"""Uniform integer quantization grids: scales, zero points, quantize-dequantize.

One convention for every method, so RTN and GPTQ results are comparable and match what
packed GPTQ kernels compute:
- asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1), z an integer, w ≈ s * (q - z);
- symmetric: z = 2^(b-1) fixed (the GPTQ/Marlin convention), s = 2 * max|w| / (2^b - 1).
  At 1 bit that grid would be {-2a, 0}, which is useless, so 1-bit symmetric uses z = 1/2:
  the two levels ±a (a binary, sign-times-scale quantizer that no packed kernel runs anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Grid:
    """Per-row quantization parameters for one group of columns: scale and zero have shape (rows, 1)."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, maxq] (as floats) for w, broadcasting over columns."""
        return torch.clamp(torch.round(w / self.scale + self.zero), 0, self.maxq)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return self.scale * (q - self.zero)

    def qdq(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w))


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> Grid:
    """Min/max grid for each row of w (rows × columns of one group)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    w = w.float()
    maxq = 2**bits - 1
    wmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    wmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, 0.5 if bits == 1 else (maxq + 1) / 2)
    else:
        span = wmax - wmin
        all_zero = span == 0
        wmin = torch.where(all_zero, -torch.ones_like(wmin), wmin)
        wmax = torch.where(all_zero, torch.ones_like(wmax), wmax)
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / scale)
    return Grid(scale=scale, zero=zero, maxq=maxq)


def qdq_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a (out_features, in_features) weight.

    group_size = -1 fits one grid per output row; otherwise one per `group_size` input columns,
    the last group ragged when group_size does not divide in_features.
    """
    w = weight.float()
    cols = w.shape[1]
    step = cols if group_size == -1 else group_size
    out = torch.empty_like(w)
    for start in range(0, cols, step):
        block = w[:, start:start + step]
        out[:, start:start + step] = fit_grid(block, bits, sym).qdq(block)
    return out.to(weight.dtype)

