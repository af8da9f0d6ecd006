"""lm-eval scoring with the head and the log-softmax run only where a batch scores (sweep/measure/scored_lm.py):
the same log-likelihoods, bit for bit, as lm-eval's own HFLM."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CPU_DTYPES, make_config
from sweep.data import calibration
from sweep.measure.scored_lm import batch_first_scored, first_scored_positions
from sweep.models.loading import load_model


def test_first_scored_positions_follow_lm_eval_s_truncation():
    table = first_scored_positions([(None, [1, 2, 3], [4, 5]), (None, [9] * 10, [7, 8])], max_length=6)
    # input = the last max_length + 1 tokens of context + continuation, minus the last; the continuation's
    # tokens are predicted by the input's last len(continuation) positions.
    assert table == {(1, 2, 3, 4): 2, (9, 9, 9, 9, 9, 7): 4}


def test_a_row_ending_in_zeros_never_scores_later_than_its_own_request():
    table = {(5, 6, 0): 2, (5, 6): 1, (3, 4, 0, 0): 3}
    assert batch_first_scored([[5, 6, 0, 0]], table) == 1   # (5, 6, 0) or (5, 6) + padding: the earlier one
    assert batch_first_scored([[3, 4, 0, 0], [5, 6, 0, 0]], table) == 1
    assert batch_first_scored([[3, 4, 0, 0], [8, 8, 0, 0]], table) == 0   # a row of no request: everything


def _requests(tokenizer):
    from lm_eval.api.instance import Instance

    lines = (Path(calibration.__file__).with_name("lambada_openai.test.jsonl").read_text().splitlines())[:20]
    passages = [json.loads(line)["text"] for line in lines]
    pairs = [(" ".join(p.split(" ")[:-1]), " " + p.split(" ")[-1]) for p in passages]
    lambada = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    text = Path(calibration.__file__).with_name("wikitext-2-raw-v1.test.raw").read_text()[:6000]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    return lambada, rolling


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_scored_positions_give_lm_eval_s_log_likelihoods_bit_for_bit(dtype, embedded_model_dir, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from sweep.measure import scored_lm
    from sweep.measure.quality import make_lm

    cfg = make_config("model=smollm2-135m-4l", f"model.dtype={dtype}", "eval.max_length=512")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    ours = make_lm(model, tokenizer, cfg.eval)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                  max_length=cfg.eval.max_length, softmax_dtype="float32")
    lambada, rolling = _requests(tokenizer)
    normalised = []   # positions each log-softmax call normalises
    log_softmax = torch.nn.functional.log_softmax
    monkeypatch.setattr(torch.nn.functional, "log_softmax",
                        lambda x, *a, **k: normalised.append(x.shape[-2]) or log_softmax(x, *a, **k))
    headed = []       # positions the head runs over
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: headed.append(args[0].shape[-2]))

    def positions(counted):
        total = sum(counted)
        counted.clear()
        return total

    got = ours.loglikelihood(lambada)
    ours_normalised, ours_headed = positions(normalised), positions(headed)
    want = theirs.loglikelihood(lambada)
    theirs_normalised, theirs_headed = positions(normalised), positions(headed)
    assert got == want
    # most positions of a LAMBADA passage are not scored: neither normalised nor run through the head
    assert ours_normalised * 4 < theirs_normalised
    assert ours_headed * 4 < theirs_headed
    assert ours.loglikelihood_rolling(rolling) == theirs.loglikelihood_rolling(rolling)
    normalised.clear()
    headed.clear()

    # A model whose forward does not take logits_to_keep: the head runs everywhere, the logits are sliced.
    monkeypatch.setattr(scored_lm, "_takes_logits_to_keep", lambda model: False)
    assert ours.loglikelihood(lambada) == want
    assert positions(headed) == theirs_headed
    assert positions(normalised) == ours_normalised
