"""Mixed precision: per-module bits and group sizes from `method.layer_bits`, and the arithmetic of
bits per weight.

`method.layer_bits` maps module-name patterns to a bit width, or to {bits, group_size}:

    {"mlp.down_proj": 8, "layers.0.*": 8, "lm_head": {"bits": 8, "group_size": 32}}

A pattern is a shell-style glob (fnmatch) matched against the module's full name
(`model.layers.0.mlp.down_proj`) or any dot-separated tail of it (`mlp.down_proj`,
`0.mlp.down_proj`), so short patterns work on any architecture. When several patterns match a
module, the last one wins (the mapping's order). Bits 16 means "leave this module unquantized"
(it is stored at 16 bits in the packed format). Modules no pattern matches take the top-level
`bits` and `group_size`.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from sweep.quant.storage import storage_bits_per_weight

KEEP_BITS = 16                      # "not quantized": stored as fp16 in a packed checkpoint
ALLOWED_BITS = tuple(range(1, 9)) + (KEEP_BITS,)


@dataclass(frozen=True)
class LayerSetting:
    bits: int
    group_size: int

    @property
    def quantized(self) -> bool:
        return self.bits != KEEP_BITS


def parse_layer_bits(layer_bits: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Dict[str, int]], List[str]]:
    """`method.layer_bits` → ({pattern: {"bits"?: int, "group_size"?: int}}, problems). Needs no model."""
    parsed: Dict[str, Dict[str, int]] = {}
    errors: List[str] = []
    for pattern, value in dict(layer_bits or {}).items():
        field = f"method.layer_bits[{pattern!r}]"
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"bits", "group_size"})
            if unknown or not value:
                errors.append(f"{field}={dict(value)!r} is not allowed: give bits and/or group_size, e.g. "
                              "{bits: 8, group_size: 32}")
                continue
            entry = {k: value[k] for k in ("bits", "group_size") if k in value}
        else:
            entry = {"bits": value}
        bits = entry.get("bits")
        if "bits" in entry and (isinstance(bits, bool) or bits not in ALLOWED_BITS):
            errors.append(f"{field}: bits={bits!r} is not allowed: an integer from 1 to 8, or {KEEP_BITS} "
                          "(leave the module unquantized)")
        group = entry.get("group_size")
        if "group_size" in entry and (isinstance(group, bool) or not isinstance(group, int)
                                      or (group != -1 and group < 1)):
            errors.append(f"{field}: group_size={group!r} is not allowed: -1 (per output channel) or a positive "
                          "group size such as 32, 64, 128")
        parsed[str(pattern)] = entry
    return parsed, errors


def pattern_matches(pattern: str, module_name: str) -> bool:
    return fnmatchcase(module_name, pattern) or fnmatchcase(module_name, "*." + pattern)


def unmatched_patterns(patterns: Iterable[str], module_names: Iterable[str]) -> List[str]:
    names = list(module_names)
    return [p for p in patterns if not any(pattern_matches(p, n) for n in names)]


def unmatched_message(unmatched: List[str], module_names: List[str], quantize_lm_head: bool) -> str:
    examples = ", ".join(repr(n) for n in module_names[:3])
    head = "" if quantize_lm_head else " (lm_head is only a target with quantize_lm_head=true)"
    return (f"method.layer_bits: pattern(s) {', '.join(repr(p) for p in unmatched)} match no module the method "
            f"quantizes{head}; module names look like {examples}, ... and patterns may name any dot-separated "
            "tail of them, e.g. 'mlp.down_proj' or 'layers.0.*'")


def plan_layers(module_names: Iterable[str], layer_bits: Optional[Mapping[str, Any]], bits: int,
                group_size: int, quantize_lm_head: bool = False) -> Dict[str, LayerSetting]:
    """Bits and group size for every target module; raises ValueError on a bad or unmatched pattern."""
    names = list(module_names)
    parsed, errors = parse_layer_bits(layer_bits)
    if errors:
        raise ValueError("; ".join(errors))
    unmatched = unmatched_patterns(parsed, names)
    if unmatched:
        raise ValueError(unmatched_message(unmatched, names, quantize_lm_head))
    plan = {}
    for name in names:
        setting = {"bits": bits, "group_size": group_size}
        for pattern, entry in parsed.items():
            if pattern_matches(pattern, name):
                setting.update(entry)
        plan[name] = LayerSetting(**setting)
    return plan


def record_storage_bits(record: Mapping[str, Any], sym: bool) -> float:
    """Bits per weight of one module in a packed checkpoint (a quantized-layer record of QuantReport).

    A record may carry its own `storage_bits` when its format is not the grid's codes plus an fp16
    scale (and a `bits`-wide zero) per group: HQQ keeps float zeros, 5/6-bit codes in whole bytes,
    FP8 float32 scales. Those backends measure it from the tensors they hold."""
    if record["bits"] == KEEP_BITS:
        return float(KEEP_BITS)
    if record.get("storage_bits") is not None:
        return float(record["storage_bits"])
    return storage_bits_per_weight(record["bits"], record["group_size"], record["in_features"], sym)


def average_bits(records: Mapping[str, Mapping[str, Any]], sym: bool) -> Dict[str, float]:
    """Weighted by each module's number of weights, over every module the method targeted:
    `quant.avg_bits` counts the codes only; `quant.bits_per_weight` adds the per-group fp16 scale
    (and zero point if asymmetric), or takes a record's measured `storage_bits`, exactly as
    `memory.packed_weights_mb` does."""
    weights = sum(r["in_features"] * r["out_features"] for r in records.values())
    if not weights:
        return {}
    code_bits = sum(r["bits"] * r["in_features"] * r["out_features"] for r in records.values())
    stored_bits = sum(record_storage_bits(r, sym) * r["in_features"] * r["out_features"] for r in records.values())
    return {"quant.avg_bits": code_bits / weights, "quant.bits_per_weight": stored_bits / weights}
