"""What a packed format stores per weight, from the quantization settings alone (no tensors).

Kept apart from sweep/quant/grid.py, which needs torch, so that the allocation command and the
mixed-precision accounting (`python -m sweep.allocate`, sweep/quant/layer_bits.py) start without it.
"""
from __future__ import annotations


def storage_bits_per_weight(bits: int, group_size: int, in_features: int, sym: bool) -> float:
    """Bits per weight of the packed format: codes plus an fp16 scale (and a `bits`-wide zero if asymmetric) per group."""
    groups_per_row = 1 if group_size == -1 else -(-in_features // group_size)
    overhead = groups_per_row * (16 + (0 if sym else bits))
    return bits + overhead / in_features
