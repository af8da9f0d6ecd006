"""A grid point's identity: a hash of everything that determines its result, for resume and for grouping.

Two configs with the same hash produce the same run, so a re-launched sweep skips a point whose
finished run is already in the store. Bookkeeping fields (where to log, whether to resume) and
the knobs a method ignores are left out: `method=rtn damp_percent=0.1` is the same point as
`method=rtn`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any, Dict, Optional

from sweep.config.schema import SweepConfig
from sweep.methods import get_method

# Fields that never change a grid point's result: they are left out of its identity.
_NOT_IN_HASH = {"resume", "force", "tracking", "cache_dir", "objective"}
KNOBS = ("bits", "group_size", "sym", "damp_percent", "desc_act", "quantize_lm_head")


def result_fields(cfg: SweepConfig, device: Optional[str] = None) -> Dict[str, Any]:
    """What determines a grid point's result: the config minus bookkeeping, minus knobs its method ignores.

    `device` is the resolved device ("cpu", "cuda:0"); "auto" alone would let a CPU result
    stand in for a GPU one.
    """
    data = asdict(cfg)
    if device is not None:
        data["device"] = device.split(":")[0]
    for key in _NOT_IN_HASH:
        data.pop(key, None)
    method = get_method(cfg.method_name)
    for knob in KNOBS:
        if knob not in method.knobs:
            data.pop(knob, None)
    if not method.needs_calibration:
        data.pop("calibration", None)
    return data


def config_hash(cfg: SweepConfig, device: Optional[str] = None) -> str:
    blob = json.dumps(result_fields(cfg, device), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
