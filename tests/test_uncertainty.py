"""The statistics behind every interval and verdict, on data whose truth is known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sweep.analysis.significance import compare, estimate, pool
from sweep.measure.uncertainty import METRICS, MIN_ITEMS, metric_intervals, ratio_interval

WORD_PPL = METRICS["wikitext.word_perplexity"]


def test_bootstrap_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    """Documents drawn from a known population: the 95% interval of Σnll/Σwords must hold the
    population's ratio in roughly 95% of 200 test sets (a wrong interval lands far from it)."""
    rng = np.random.default_rng(1)
    true_nll_per_word = 3.2
    covered = 0
    trials = 200
    for _ in range(trials):
        words = rng.integers(300, 3000, 40).astype(float)
        difficulty = rng.lognormal(0.0, 0.15, 40)  # documents differ in difficulty, mean-one noise per word
        nll = words * true_nll_per_word * difficulty / math.exp(0.15 ** 2 / 2)
        low, high, _ = ratio_interval(nll, words)
        covered += low <= true_nll_per_word <= high
    assert 0.88 <= covered / trials <= 0.99, covered


def test_too_few_items_give_no_interval():
    assert ratio_interval(np.ones(MIN_ITEMS - 1), np.ones(MIN_ITEMS - 1)) is None
    items = {"wikitext": {"doc_id": [0, 1], "nll": [100.0, 200.0], "words": [30.0, 60.0], "bytes": [150.0, 300.0]}}
    out = metric_intervals(items)
    assert out["wikitext.word_perplexity_items"] == 2 and "wikitext.word_perplexity_ci_low" not in out


def _runs(rng, shift, n_runs, docs=30, seed_noise=0.0):
    words = np.linspace(200, 3000, docs)
    base = words * (3.0 + rng.normal(0, 0.3, docs))   # documents differ a lot in difficulty
    runs = []
    for _ in range(n_runs):
        offset = rng.normal(0, seed_noise)
        runs.append({"wikitext": {"doc_id": list(range(docs)),
                                  "nll": list(base + words * (shift + offset + rng.normal(0, 0.005, docs))),
                                  "words": list(words), "bytes": list(words * 5)}})
    return runs


def test_paired_comparison_finds_a_real_difference_and_its_sign():
    rng = np.random.default_rng(2)
    shared = _runs(rng, 0.0, 1)[0]["wikitext"]
    words = np.array(shared["words"])
    better = [{"wikitext": {**shared}}]
    worse = [{"wikitext": {**shared, "nll": list(np.array(shared["nll"]) + words * 0.02)}}]  # +0.02 nats/word
    a, b = pool(WORD_PPL, worse, seeded=False), pool(WORD_PPL, better, seeded=False)
    result = compare(a, b)
    assert result.difference == pytest.approx(0.02)
    assert result.p < 1e-6 and result.verdict(lower_is_better=True) .startswith("worse")
    assert compare(b, a).verdict(lower_is_better=True).startswith("better")
    # Unpaired, the same 2% difference hides inside the documents' spread: the intervals overlap.
    ea, eb = estimate(a), estimate(b)
    assert ea.ci_low < eb.ci_high


def test_seed_noise_larger_than_the_difference_makes_it_the_same():
    rng = np.random.default_rng(3)
    a = pool(WORD_PPL, _runs(rng, 0.00, 3, seed_noise=0.05), seeded=True)
    b = pool(WORD_PPL, _runs(np.random.default_rng(3), 0.01, 3, seed_noise=0.05), seeded=True)
    result = compare(a, b)
    assert result.verdict(lower_is_better=True).startswith("same"), result
    # One seed of a calibrated method: the seed noise is unknown, and the verdict says so.
    single = pool(WORD_PPL, _runs(rng, 0.0, 1), seeded=True)
    assert "eval only" in compare(single, b).verdict(lower_is_better=True)


def test_runs_on_different_items_are_not_compared():
    rng = np.random.default_rng(4)
    a = pool(WORD_PPL, _runs(rng, 0.0, 1, docs=20), seeded=False)
    b = pool(WORD_PPL, _runs(rng, 0.0, 1, docs=25), seeded=False)
    assert compare(a, b) is None
