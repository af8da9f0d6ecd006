"""A grid point's identity: a hash of everything that determines its result, for resume and for grouping.

Two configs with the same hash produce the same run, so a re-launched sweep skips a point whose
finished run is already in the store. Bookkeeping fields (where to log, whether to resume) and
the knobs a method ignores are left out: `method=rtn damp_percent=0.1` is the same point as
`method=rtn`. The seed is left out for methods it does not change (no calibration draw): RTN at
seed=0,1,2 is one point, run once.

`config_group` is the hash without the seeds: the runs of one configuration over several seeds,
which the report aggregates. `baseline_config` is the unquantized run every configuration's
deltas are against: the same model, evaluation, benchmark and device, method fp16.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from typing import Any, Dict, Optional

from sweep.config.schema import SweepConfig
from sweep.methods import get_method
from sweep.models.loading import resolve_dtype

# Fields that never change a grid point's result: they are left out of its identity.
_NOT_IN_HASH = {"resume", "force", "baseline", "tracking", "cache_dir", "objective"}
KNOBS = ("bits", "group_size", "sym", "damp_percent", "desc_act", "quantize_lm_head")


def result_fields(cfg: SweepConfig, device: Optional[str] = None) -> Dict[str, Any]:
    """What determines a grid point's result: the config minus bookkeeping, minus knobs its method ignores.

    `device` is the resolved device ("cpu", "cuda:0"); "auto" alone would let a CPU result
    stand in for a GPU one.
    """
    data = asdict(cfg)
    if device is not None:
        data["device"] = device.split(":")[0]
        # "auto" means bfloat16 on one CPU and float32 on another: the dtype the run will use counts.
        data["model"]["dtype"] = str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", "")
    for key in _NOT_IN_HASH:
        data.pop(key, None)
    method = get_method(cfg.method_name)
    for knob in KNOBS:
        if knob not in method.knobs:
            data.pop(knob, None)
    if not seeded(cfg):
        data.pop("calibration", None)
        data.pop("seed", None)
    elif cfg.calibration.source != "self_generated":
        data["calibration"].pop("generation", None)   # how the model would write samples: unused here
    return data


def seeded(cfg: SweepConfig) -> bool:
    """Whether the seed can change this point's result: only methods that draw calibration samples."""
    return get_method(cfg.method_name).needs_calibration


def config_hash(cfg: SweepConfig, device: Optional[str] = None) -> str:
    return fields_hash(result_fields(cfg, device))


def fields_hash(fields: Dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_group(cfg: SweepConfig, device: Optional[str] = None) -> str:
    """The hash of the point without its seeds: the same for the runs of one configuration over seeds."""
    fields = result_fields(cfg, device)
    fields.pop("seed", None)
    fields.get("calibration", {}).pop("seed", None)
    return fields_hash(fields)


def baseline_config(cfg: SweepConfig) -> SweepConfig:
    """The unquantized run this point is compared with (its deltas, `vs_fp16`)."""
    return replace(cfg, method={"name": "fp16"})
