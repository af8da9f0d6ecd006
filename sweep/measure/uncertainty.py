"""How uncertain an evaluation number is, from the per-item results lm-eval logs (documents, passages).

Every quality metric sweep reports is a ratio of sums over evaluation items:

    WikiText-2 word perplexity  = exp(Σ nll / Σ words)   over documents
    WikiText-2 byte perplexity  = exp(Σ nll / Σ bytes);  bits per byte = Σ nll / Σ bytes / ln 2
    LAMBADA perplexity          = exp(Σ nll / n)         over passages;  accuracy = Σ correct / n

(nll: an item's negative log-likelihood in nats). So one `ItemMetric` per metric names the task, the
numerator, the denominator and the monotone transform, and everything else is shared: the value,
a bootstrap confidence interval over items (scipy.stats.bootstrap, percentile method, a fixed
random state so that the same items always give the same interval), and paired differences
between two models scored on the same items (sweep/analysis/significance.py).

Items are the unit that is resampled because they are what the test set samples: tokens inside a
document are not independent of each other. With fewer than MIN_ITEMS items no interval is given:
a bootstrap over two documents (eval=quick before it scored 10) says nothing about the noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95
MIN_ITEMS = 10
N_RESAMPLES = 2000
RANDOM_STATE = 0

# The per-item fields of the eval_items.json artifact, by task (sweep/measure/quality.py writes it).
ITEM_FIELDS = {"wikitext": ("doc_id", "nll", "words", "bytes"), "lambada": ("doc_id", "nll", "correct")}


@dataclass(frozen=True)
class ItemMetric:
    """A metric = transform(Σ numerator / Σ denominator) over one task's items."""

    name: str                               # the run metric, e.g. "wikitext.word_perplexity"
    task: str
    numerator: str                          # an item field
    denominator: Optional[str]              # an item field, or None: the number of items
    transform: Callable[[float], float]     # monotone increasing, from the ratio to the metric
    lower_is_better: bool = True

    def ratio_parts(self, items: Mapping[str, Sequence[float]]) -> Tuple[np.ndarray, np.ndarray]:
        num = np.asarray(items[self.numerator], dtype=np.float64)
        den = np.ones_like(num) if self.denominator is None else np.asarray(items[self.denominator], dtype=np.float64)
        return num, den

    def value(self, items: Mapping[str, Sequence[float]]) -> float:
        num, den = self.ratio_parts(items)
        return self.transform(float(num.sum() / den.sum()))


def _ln2(x: float) -> float:
    return x / math.log(2)


def _identity(x: float) -> float:
    return x


METRICS: Dict[str, ItemMetric] = {m.name: m for m in [
    ItemMetric("wikitext.word_perplexity", "wikitext", "nll", "words", math.exp),
    ItemMetric("wikitext.byte_perplexity", "wikitext", "nll", "bytes", math.exp),
    ItemMetric("wikitext.bits_per_byte", "wikitext", "nll", "bytes", _ln2),
    ItemMetric("lambada.perplexity", "lambada", "nll", None, math.exp),
    ItemMetric("lambada.acc", "lambada", "correct", None, _identity, lower_is_better=False),
]}


def _ratio(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    return num.sum(axis=axis) / den.sum(axis=axis)


def ratio_interval(num: np.ndarray, den: np.ndarray, confidence: float = CONFIDENCE) -> Optional[Tuple[float, float, float]]:
    """(low, high, standard error) of Σnum/Σden by a bootstrap over items; None with too few items."""
    from scipy.stats import bootstrap

    if len(num) < MIN_ITEMS:
        return None
    if np.all(num == num[0]) and np.all(den == den[0]):   # no spread at all: the ratio is exact
        r = float(num.sum() / den.sum())
        return r, r, 0.0
    res = bootstrap((num, den), _ratio, paired=True, vectorized=True, n_resamples=N_RESAMPLES,
                    confidence_level=confidence, method="percentile", random_state=RANDOM_STATE)
    return float(res.confidence_interval.low), float(res.confidence_interval.high), float(res.standard_error)


def metric_intervals(items_by_task: Mapping[str, Mapping[str, Sequence[float]]]) -> Dict[str, float]:
    """For each metric whose task was scored: `<metric>_ci_low` and `<metric>_ci_high` (95%), on the
    metric's own scale, and `<metric>_items` (how many items it rests on)."""
    out: Dict[str, float] = {}
    for metric in METRICS.values():
        items = items_by_task.get(metric.task)
        if not items:
            continue
        num, den = metric.ratio_parts(items)
        out[f"{metric.name}_items"] = float(len(num))
        interval = ratio_interval(num, den)
        if interval is not None:
            low, high, _ = interval
            out[f"{metric.name}_ci_low"] = metric.transform(low)
            out[f"{metric.name}_ci_high"] = metric.transform(high)
    return out


def items_from_samples(task: str, samples: List[dict]) -> Dict[str, List[float]]:
    """lm-eval's logged samples (log_samples=True) → per-item fields of ITEM_FIELDS[task], in doc order.

    lm-eval's wikitext task records (loglikelihood, words) per document under word_perplexity and
    (loglikelihood, bytes) under byte_perplexity; lambada_openai records the target's
    loglikelihood under perplexity and 0/1 under acc.
    """
    rows = sorted(samples, key=lambda s: s["doc_id"])
    if task == "wikitext":
        return {"doc_id": [s["doc_id"] for s in rows],
                "nll": [-float(s["word_perplexity"][0]) for s in rows],
                "words": [float(s["word_perplexity"][1]) for s in rows],
                "bytes": [float(s["byte_perplexity"][1]) for s in rows]}
    if task == "lambada":
        return {"doc_id": [s["doc_id"] for s in rows],
                "nll": [-float(s["perplexity"]) for s in rows],
                "correct": [float(s["acc"]) for s in rows]}
    raise ValueError(f"no per-item fields for task {task!r}")
