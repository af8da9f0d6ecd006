"""The quantized model of a grid point, kept for the next point of the same sweep that only measures it differently.

A sweep over `bench.batch_size`, `bench.mode` or the evaluation settings would quantize the same model
once per point (on the 8B shape, minutes each). Quantization is deterministic (same config and seed,
the same weights: tests/test_trustworthy.py), so those points measure the model the point before them
made instead. Rules:

- only points of one sweep, in one process, share a model (a single run or a new sweep never reuses),
  and only when everything but `bench` and `eval` is the same (`quantized_model_key`);
- one model is held at a time: the next point with another key drops it before loading its own, so
  holding it never costs a second model's memory;
- a point whose evaluation cast the model (`eval.dtype` other than the model's) does not pass it on;
- the reusing run says so (tag `quantized.reused_from` = the run that quantized) and logs that run's
  load, calibration and quantization time and memory: what producing the model it measured cost.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from sweep.backends.checkpoint import free_accelerator_memory
from sweep.config.schema import SweepConfig
from sweep.methods.base import QuantReport
from sweep.pipeline.identity import fields_hash, result_fields

TAG_REUSED_FROM = "quantized.reused_from"
# The phases a reusing point skips; their times and memory peaks come from the run that ran them.
QUANTIZE_PHASES = ("load", "calibrate", "quantize")


def quantized_model_key(cfg: SweepConfig, device: str, sweep_id: str) -> str:
    """What determines the quantized model (not what is measured on it), within one sweep."""
    fields = result_fields(cfg, device)
    fields.pop("bench", None)
    fields.pop("eval", None)
    fields["sweep_id"] = sweep_id
    return fields_hash(fields)


@dataclass
class HeldModel:
    key: str
    model: torch.nn.Module
    tokenizer: Any
    report: QuantReport
    run_id: str                                   # the run that loaded and quantized it
    workdir: str                                  # its checkpoint folder (a packed model may still map its files)
    dtype: torch.dtype                            # as quantized: a later cast means it is not handed on
    metrics: Dict[str, float] = field(default_factory=dict)   # load/calibrate/quantize times, sizes, quant.*
    tags: Dict[str, Any] = field(default_factory=dict)        # what load/calibrate/quantize tagged
    peaks: Dict[str, float] = field(default_factory=dict)     # memory peaks of those phases
    nondeterministic_ops: List[str] = field(default_factory=list)


_held: Optional[HeldModel] = None


def take(key: str) -> Optional[HeldModel]:
    """The held model if it has this key; any other held model is dropped (memory freed) first."""
    global _held
    held, _held = _held, None
    if held is not None and held.key == key:
        return held
    if held is not None:
        discard(held)
    return None


def keep(held: HeldModel) -> None:
    """Hold this model for the next point (dropping whatever was held), unless its evaluation cast it."""
    global _held
    previous, _held = _held, None
    if previous is not None and previous is not held:
        discard(previous)
    if model_dtype(held.model) != held.dtype:
        discard(held)
        return
    _held = held


def model_dtype(model: torch.nn.Module) -> Optional[torch.dtype]:
    """A transformers model's dtype; for a bare module, its first floating-point parameter's."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def discard(held: HeldModel) -> None:
    shutil.rmtree(held.workdir, ignore_errors=True)
    held.model = None
    free_accelerator_memory()


def release() -> None:
    """Drop the held model (end of a sweep)."""
    global _held
    held, _held = _held, None
    if held is not None:
        discard(held)
