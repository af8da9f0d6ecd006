"""Is a configuration's number different from another's by more than its noise?

Two sources of noise, combined:

- **evaluation**: which documents and passages the test set holds. Two configurations scored on the
  same items are compared *paired*: the difference is taken item by item, and its standard error
  comes from a bootstrap over items of those differences (scipy.stats.bootstrap, paired). Item
  difficulty cancels out, so a paired comparison sees far smaller differences than two separate
  intervals would.
- **seeds**: the calibration draw (and any other randomness a method has). A configuration run
  with several seeds is averaged over them item by item; the spread of its per-seed values gives
  the seed part of the standard error (variance / number of seeds).

Everything is computed on the metric's ratio scale (sweep/measure/uncertainty.py: nats per word
for perplexities, the fraction for accuracy), where differences add; the two variances add, and
p = 2·(1 − Φ(|d| / se)) (a normal approximation, scipy.stats.norm). docs/report.md states the test.
A method the seed does not change (RTN, the baseline) has no seed noise; a configuration run with
one seed of a method it does change (GPTQ, AWQ, AutoRound: the calibration draw) has a seed spread
that cannot be measured from one run: its comparisons count the evaluation noise only, and say so
("eval only").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from sweep.measure.artifacts import ITEMS_ARTIFACT
from sweep.measure.uncertainty import CONFIDENCE, MIN_ITEMS, METRICS, N_RESAMPLES, RANDOM_STATE, ItemMetric
from sweep.tracking.tracker import read_artifact

ALPHA = 0.05

Items = Mapping[str, Mapping[str, Sequence[float]]]   # task → field → per-item values


def load_items(client, run_id: str) -> Optional[Dict]:
    """A run's per-item evaluation results, or None (a run from before they were logged, or no eval)."""
    try:
        return json.loads(read_artifact(client, run_id, ITEMS_ARTIFACT))
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing artifact
        return None


@dataclass
class Pooled:
    """One configuration's runs on one metric, averaged over seeds item by item."""

    metric: ItemMetric
    doc_ids: tuple                # the items, in order
    num: np.ndarray               # per-item numerator, mean over the runs
    den: np.ndarray               # per-item denominator (the same for every run)
    run_ratios: List[float]       # each run's ratio
    seeded: bool = True           # whether the method's result depends on the seed (calibrated methods)

    @property
    def runs(self) -> int:
        return len(self.run_ratios)

    @property
    def ratio(self) -> float:
        return float(self.num.sum() / self.den.sum())

    def seed_variance_of_mean(self) -> Optional[float]:
        """Variance of the seed-mean from the runs' spread: 0 for a method the seed does not change,
        None for one run of a method it does (unknown)."""
        if not self.seeded:
            return 0.0
        if self.runs < 2:
            return None
        return float(np.var(self.run_ratios, ddof=1)) / self.runs


def pool(metric: ItemMetric, runs_items: Sequence[Items], seeded: bool = True) -> Optional[Pooled]:
    """The runs' items for `metric` averaged item by item; None if a run lacks them or runs scored different items."""
    parts = []
    for items in runs_items:
        task = (items or {}).get(metric.task)
        if not task:
            return None
        parts.append((tuple(task["doc_id"]), *metric.ratio_parts(task)))
    # The same items: the same documents, and the same words/bytes in each (a different eval limit or
    # test-set version would not be).
    if not parts or len({p[0] for p in parts}) != 1 or any(not np.array_equal(p[2], parts[0][2]) for p in parts):
        return None
    nums = np.stack([p[1] for p in parts])
    den = parts[0][2]
    return Pooled(metric, parts[0][0], nums.mean(axis=0), den, [float(n.sum() / den.sum()) for n in nums], seeded)


def _bootstrap_se(num: np.ndarray, den: np.ndarray) -> float:
    from scipy.stats import bootstrap

    if np.all(num == num[0]) and np.all(den == den[0]):
        return 0.0
    res = bootstrap((num, den), lambda n, d, axis=-1: n.sum(axis=axis) / d.sum(axis=axis), paired=True,
                    vectorized=True, n_resamples=N_RESAMPLES, method="percentile", random_state=RANDOM_STATE)
    return float(res.standard_error)


@dataclass
class Estimate:
    """A configuration's value on one metric with its interval (eval and seed noise combined)."""

    value: float                  # the metric of the seed-averaged items
    ci_low: float
    ci_high: float
    se_ratio: float               # standard error on the ratio scale
    items: int
    seed_noise_known: bool        # False: one run, so the interval holds the evaluation noise only


def estimate(pooled: Pooled) -> Optional[Estimate]:
    from scipy.stats import norm

    if len(pooled.num) < MIN_ITEMS:
        return None
    seed_var = pooled.seed_variance_of_mean()
    se = math.sqrt(_bootstrap_se(pooled.num, pooled.den) ** 2 + (seed_var or 0.0))
    z = norm.ppf(0.5 + CONFIDENCE / 2)
    t = pooled.metric.transform
    return Estimate(t(pooled.ratio), t(pooled.ratio - z * se), t(pooled.ratio + z * se), se, len(pooled.num),
                    seed_var is not None)


@dataclass
class Comparison:
    """A − B on one metric's ratio scale (nats per word or per passage; accuracy as a fraction)."""

    difference: float
    se: float
    p: float
    items: int
    eval_only: bool               # a side with one run: seed noise could not be counted

    def verdict(self, lower_is_better: bool, alpha: float = ALPHA) -> str:
        """'better' / 'worse' (A than B) when p < alpha, else 'same'; with the p-value."""
        note = ", eval only" if self.eval_only else ""
        if self.p >= alpha:
            return f"same (p={self.p:.2g}{note})"
        a_better = (self.difference < 0) == lower_is_better
        return f"{'better' if a_better else 'worse'} (p={self.p:.2g}{note})"


def compare(a: Pooled, b: Pooled) -> Optional[Comparison]:
    """Paired comparison of two configurations scored on the same items; None if they were not
    (different items or evaluation limits), or on too few items to say anything."""
    from scipy.stats import norm

    if a.doc_ids != b.doc_ids or len(a.num) < MIN_ITEMS:
        return None
    difference = a.ratio - b.ratio
    seed_a, seed_b = a.seed_variance_of_mean(), b.seed_variance_of_mean()
    se = math.sqrt(_bootstrap_se(a.num - b.num, a.den) ** 2 + (seed_a or 0.0) + (seed_b or 0.0))
    if se == 0.0:
        p = 1.0 if difference == 0 else 0.0
    else:
        p = float(2 * norm.sf(abs(difference) / se))
    return Comparison(difference, se, p, len(a.num), eval_only=seed_a is None or seed_b is None)


def metric(name: str) -> ItemMetric:
    return METRICS[name]
