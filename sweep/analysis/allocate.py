"""Per-layer bits under a weight-memory budget, from a sensitivity run (`python -m sweep.allocate`).

Greedy marginal-gain allocation (not an exact knapsack): every decoder layer group (one layer's
attention, or its MLP) starts at the lowest allowed bit width; then, while the budget allows,
the one-step upgrade (to the group's next allowed width) with the largest predicted loss
reduction per extra bit of storage is applied. The predicted loss of a group at b bits is its
measured increase of the probe's log-perplexity at the sensitivity run's width b0, scaled by
4^(b0 - b) (RTN noise power falls 4x per extra bit), and 0 at 16 bits. Because that loss is
convex in the bits, the greedy choice is close to the knapsack optimum (it is optimal whenever
the last upgrade fills the budget exactly) at a fraction of the code.

Costs count exactly what `memory.packed_weights_mb` and `quant.bits_per_weight` count: codes plus
the per-group fp16 scale (and zero point if asymmetric). lm_head is left as it is (its
sensitivity is measured and shown, but it is not allocated).

The result is written as a Hydra config option `conf/layer_bits/<name>.yaml`, so it runs as a
normal grid point beside uniform ones:  python -m sweep method=rtn +layer_bits=none,<name> -m
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sweep.config.schema import CONF_DIR
from sweep.quant.storage import storage_bits_per_weight
from sweep.quant.layer_bits import ALLOWED_BITS, KEEP_BITS

MB = 1024 * 1024
DEFAULT_LEVELS = (3, 4, 8)
MIN_SENSITIVITY = 1e-6   # nats: a group the probe cannot see degrade still costs something to quantize


@dataclass
class Allocation:
    bits: Dict[str, int]              # group name → bits
    layer_bits: Dict[str, int]        # method.layer_bits: group pattern → bits
    group_size: int
    sym: bool
    bits_per_weight: float            # over the decoder linears, with scale/zero overhead
    packed_mb: float                  # the whole model's packed weights (memory.packed_weights_mb)
    predicted_delta_nll: float        # sum of the groups' predicted loss increases (nats/token)


def group_bits(row: Dict[str, Any], bits: int, group_size: int, sym: bool) -> float:
    """Storage bits of one layer group at `bits`."""
    total = 0.0
    for in_features, out_features in row["modules"].values():
        per_weight = KEEP_BITS if bits == KEEP_BITS else storage_bits_per_weight(bits, group_size, in_features, sym)
        total += per_weight * in_features * out_features
    return total


def predicted_loss(row: Dict[str, Any], bits: int, measured_bits: int) -> float:
    if bits == KEEP_BITS:
        return 0.0
    return max(row["delta_nll"], MIN_SENSITIVITY) * 4.0 ** (measured_bits - bits)


def allocate(table: Dict[str, Any], levels: Sequence[int] = DEFAULT_LEVELS, budget_bits: Optional[float] = None,
             budget_mb: Optional[float] = None, group_size: Optional[int] = None) -> Allocation:
    """Per-group bits under the budget: average storage bits per decoder weight, or the model's packed MB."""
    if (budget_bits is None) == (budget_mb is None):
        raise ValueError("give exactly one budget: budget_bits (average bits per weight) or budget_mb")
    levels = sorted(set(levels))
    bad = [b for b in levels if b not in ALLOWED_BITS]
    if bad or not levels:
        raise ValueError(f"levels={list(levels)} is not allowed: bit widths from 1 to 8, or {KEEP_BITS}")
    group_size = table["group_size"] if group_size is None else group_size
    sym = table["sym"]
    rows = [r for r in table["groups"] if r["layer"] is not None]
    if not rows:
        raise ValueError("the sensitivity table has no decoder layer groups")
    weights = sum(i * o for r in rows for i, o in r["modules"].values())
    available = budget_bits * weights if budget_bits is not None else budget_mb * 8 * MB - table["fixed_bits"]
    chosen = {r["group"]: levels[0] for r in rows}
    used = sum(group_bits(r, levels[0], group_size, sym) for r in rows)
    if used > available:
        need = used / weights if budget_bits is not None else (used + table["fixed_bits"]) / 8 / MB
        unit = "bits per weight" if budget_bits is not None else "MB"
        raise ValueError(f"the budget is below the smallest allocation: every group at {levels[0]} bits needs "
                         f"{need:.3f} {unit}; raise the budget or allow lower levels")
    while True:
        best, best_ratio = None, 0.0
        for r in rows:
            current = chosen[r["group"]]
            if current == levels[-1]:
                continue
            nxt = levels[levels.index(current) + 1]
            extra = group_bits(r, nxt, group_size, sym) - group_bits(r, current, group_size, sym)
            if used + extra > available:
                continue
            gain = predicted_loss(r, current, table["bits"]) - predicted_loss(r, nxt, table["bits"])
            ratio = gain / extra
            if best is None or ratio > best_ratio:
                best, best_ratio = (r, nxt, extra), ratio
        if best is None:
            break
        row, nxt, extra = best
        chosen[row["group"]] = nxt
        used += extra
    return Allocation(
        bits=chosen, layer_bits={r["pattern"]: chosen[r["group"]] for r in rows}, group_size=group_size, sym=sym,
        bits_per_weight=used / weights, packed_mb=(used + table["fixed_bits"]) / 8 / MB,
        predicted_delta_nll=sum(predicted_loss(r, chosen[r["group"]], table["bits"]) for r in rows))


def hydra_dict(mapping: Dict[str, Any]) -> str:
    """A mapping in Hydra's override syntax: {layers.0.mlp.*:8,...}."""
    return "{" + ",".join(f"{k}:{v}" for k, v in mapping.items()) + "}"


def write_option(alloc: Allocation, name: str, source: str, conf_dir: Path = CONF_DIR) -> Path:
    """<conf_dir>/layer_bits/<name>.yaml: a config option that sets the whole allocation."""
    import yaml

    directory = conf_dir / "layer_bits"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    body = {"group_size": alloc.group_size, "sym": alloc.sym, "quantize_lm_head": False,
            "method": {"layer_bits": alloc.layer_bits}}
    header = (f"# @package _global_\n# Written by `python -m sweep.allocate` from {source}.\n"
              f"# {alloc.bits_per_weight:.4f} bits per decoder weight, {alloc.packed_mb:.2f} MB packed weights.\n"
              f"# Run:  python -m sweep method=rtn +layer_bits={name}   (or method=gptq)\n")
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path
