"""The number a search minimises for one grid point (the Hydra task function returns it).

Hydra's Optuna sweeper reads the task function's return value as the trial's objective. Ours
is a quality metric (perplexity by default) of the finished point; a point over the memory
budget, or one that failed, gets a penalty instead of being dropped, so that the search learns
where not to go and carries on (the sweeper stops a study on failed trials by default).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from sweep.config.schema import ObjectiveConfig

# Worse than any perplexity a model that works at all can reach; over-budget points are ranked
# by how far over they are (PENALTY × used/budget), failed ones below all of them.
PENALTY = 1e12
FAILED = 1e15


def objective(cfg: ObjectiveConfig, status: str, metrics: Dict[str, float]) -> float:
    value = _finite(metrics.get(cfg.metric))
    if status == "FAILED" or value is None:
        return FAILED
    if cfg.memory_budget_mb is not None:
        used = _finite(metrics.get(cfg.memory_metric))
        if used is None:
            return FAILED
        if used > cfg.memory_budget_mb:
            return PENALTY * used / cfg.memory_budget_mb
    return value


def describe(cfg: ObjectiveConfig, status: str, metrics: Dict[str, float]) -> str:
    value = objective(cfg, status, metrics)
    if value >= FAILED:
        why = "failed" if status == "FAILED" else f"no finite {cfg.metric} / {cfg.memory_metric}"
        return f"objective {value:.3g} ({why})"
    if value >= PENALTY:
        return (f"objective {value:.3g} (over budget: {cfg.memory_metric}={metrics[cfg.memory_metric]:.1f} "
                f"> {cfg.memory_budget_mb} MB)")
    return f"objective {cfg.metric}={value:.4g}"


def _finite(value: Optional[float]) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(float(value)) else None
