"""Real quantization of the real embedded model, scored by lm-eval: the orderings must hold.

Uses the full 30-layer SmolLM2-135M on the first WikiText-2 article and 100 LAMBADA passages
(a few minutes on 2 cores), so every number here is a real perplexity, not a fixture. The model runs
in its default dtype (`model.dtype=auto`): bfloat16 on CPUs with bf16 instructions, the path users
get; float32 is checked bit for bit against the reference GPTQ in tests/test_cpu_paths.py and against
lm-eval's CLI in tests/test_lm_eval_parity.py.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import pytest
import torch

from conftest import make_config
from sweep.data import calibration
from sweep.measure.quality import evaluate
from sweep.methods import get_method
from sweep.models.loading import load_model
from sweep.infra.progress import Progress

LIMITS = ["eval.limit.wikitext=1", "eval.limit.lambada=100"]


@pytest.fixture(scope="module")
def scored(embedded_model_dir, tmp_path_factory):
    """wikitext word perplexity and lambada perplexity per setting, from one loaded model."""
    base_cfg = make_config("model=smollm2-135m", *LIMITS)
    model, tokenizer = load_model(base_cfg.model, "cpu", base_cfg.cache_dir)
    original = copy.deepcopy(model.state_dict())
    cache = tmp_path_factory.mktemp("cache")
    results = {}
    settings = {
        "fp16": ["method=fp16"],
        "rtn8": ["method=rtn", "bits=8"],
        "rtn4": ["method=rtn", "bits=4"],
        "rtn3": ["method=rtn", "bits=3"],
        "rtn2": ["method=rtn", "bits=2"],
        "gptq3": ["method=gptq", "bits=3"],  # the default calibration (32 × 256 tokens on CPU), three seeds
        "gptq3-seed1": ["method=gptq", "bits=3", "seed=1"],
        "gptq3-seed2": ["method=gptq", "bits=3", "seed=2"],
    }
    for name, overrides in settings.items():
        cfg = make_config("model=smollm2-135m", "group_size=128", *LIMITS, *overrides)
        model.load_state_dict(original)
        method = get_method(cfg.method_name)(cfg)
        samples = calibration.build_samples(tokenizer, cfg.calibration) if method.needs_calibration else None
        method.quantize(model, samples, Progress(name, enabled=False))
        metrics, _, _ = evaluate(model, tokenizer, cfg.eval, cache)
        results[name] = metrics
    return results


def test_perplexity_orders_by_bits(scored):
    ppl = {k: v["wikitext.word_perplexity"] for k, v in scored.items()}
    assert ppl["fp16"] <= ppl["rtn8"] * 1.001  # 8-bit may tie the baseline, never beat it by more than noise
    assert ppl["rtn8"] < ppl["rtn4"] < ppl["rtn3"] < ppl["rtn2"], ppl


def test_lambada_orders_by_bits(scored):
    ppl = {k: v["lambada.perplexity"] for k, v in scored.items()}
    assert ppl["rtn8"] < ppl["rtn3"] < ppl["rtn2"], ppl
    assert scored["rtn8"]["lambada.acc"] > scored["rtn2"]["lambada.acc"]


def test_gptq_against_rtn_at_three_bits_judged_by_its_seed_spread(scored):
    """Three calibration seeds of GPTQ with the default calibration (32 × 256 LAMBADA-dev tokens on CPU)
    against RTN at 3 bits (RTN has no seed), as docs/calibration.md's study found it: on LAMBADA GPTQ
    is better than RTN by more than the spread between its seeds; on WikiText-2, where that calibration
    did not separate them, GPTQ's mean is no worse than RTN's by more than that spread."""
    seeds = ("gptq3", "gptq3-seed1", "gptq3-seed2")
    lambada = [scored[k]["lambada.perplexity"] for k in seeds]
    assert scored["rtn3"]["lambada.perplexity"] - max(lambada) > max(lambada) - min(lambada), \
        (lambada, scored["rtn3"]["lambada.perplexity"])
    wikitext = [scored[k]["wikitext.word_perplexity"] for k in seeds]
    assert statistics.mean(wikitext) - scored["rtn3"]["wikitext.word_perplexity"] < max(wikitext) - min(wikitext), \
        (wikitext, scored["rtn3"]["wikitext.word_perplexity"])


def test_baseline_is_a_trained_model(scored):
    # A trained 135M model scores tens on WikiText-2 words, an untrained one tens of thousands.
    assert 5 < scored["fp16"]["wikitext.word_perplexity"] < 100
    assert 0.2 < scored["fp16"]["lambada.acc"] < 0.8


def test_log_likelihoods_are_summed_in_float32_whatever_the_model_runs_in(embedded_model_dir):
    """lm-eval sums a request's token log-probabilities in the logits' dtype unless told otherwise: a
    bfloat16 model's ~1,000-nat sum would come back as a multiple of 8 (bfloat16's spacing there)."""
    from lm_eval.api.instance import Instance

    from sweep.measure.quality import make_lm

    cfg = make_config("model=smollm2-135m", "model.dtype=bfloat16")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
    text = Path(calibration.__file__).with_name("wikitext-2-raw-v1.test.raw").read_text()[:3000]
    lm = make_lm(model, tokenizer, cfg.eval)
    (loglikelihood, _), = lm.loglikelihood([Instance("loglikelihood", {}, (text[:40], text[40:]), 0)])
    assert loglikelihood < -500
    assert loglikelihood != float(torch.tensor(loglikelihood).bfloat16())
