"""Sequential calibration computes each finished part of a layer once (sweep/quant/replay.py), and the
result is the same bits as computing it on every pass."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from conftest import CPU_DTYPES, make_config
from sweep.data import calibration
from sweep.infra.progress import Progress
from sweep.models.loading import load_model
from sweep.quant import sequential
from sweep.quant.gptq_solver import gptq_quantize
from sweep.quant.layers import decoder_checksum, quantizable_linears
from sweep.quant.replay import OutputReplay, finished_modules


class _Block(nn.Module):
    """Two linears in a row, and a tuple-returning part around them, like an attention block."""

    def __init__(self, scale_in_place: bool = False):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.out = nn.Linear(8, 4)
        self.scale_in_place = scale_in_place

    def forward(self, x):
        hidden = self.inner(x)
        if self.scale_in_place:
            hidden.mul_(2.0)   # changes the recorded output of `inner` after the fact
        return self.out(hidden), None


def test_replay_returns_the_recorded_outputs_and_restores_the_modules():
    torch.manual_seed(0)
    block, x = _Block(), [torch.randn(3, 8) for _ in range(4)]
    want = [block(h)[0] for h in x]
    replay = OutputReplay()
    with replay.running([block.inner]):
        first = [block(h)[0] for h in x]
    with replay.running([block.inner]):
        second = [block(h)[0] for h in x]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(want, first, second))
    assert (replay.computed, replay.replayed) == (4, 4)   # recorded once per sample, then replayed
    assert "forward" not in block.inner.__dict__          # the class's forward applies again
    with mock.patch.object(nn.Linear, "forward", autospec=True, side_effect=nn.Linear.forward) as linear:
        block(x[0])
    assert linear.call_count == 2


def test_replay_computes_again_when_a_recorded_output_was_changed_in_place_or_the_input_differs():
    torch.manual_seed(0)
    block, x = _Block(scale_in_place=True), [torch.randn(3, 8) for _ in range(2)]
    want = [block(h)[0] for h in x]
    replay = OutputReplay()
    for _ in range(3):
        with replay.running([block.inner]):
            got = [block(h)[0] for h in x]
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert replay.replayed == 0 and replay.computed == 6
    plain = _Block()
    with replay.running([plain.inner]):
        plain(x[0])
    with replay.running([plain.inner]):
        plain(torch.randn(5, 8))   # another shape than recorded: computed
    assert replay.replayed == 0


def test_an_instance_level_forward_is_put_back_after_replay():
    block, x = _Block(), torch.randn(2, 8)
    wrapped = block.inner.forward
    block.inner.forward = lambda h: wrapped(h)    # what accelerate's hooks do
    own = block.inner.__dict__["forward"]
    replay = OutputReplay()
    for _ in range(2):
        with replay.running([block.inner]):
            block(x)
    assert block.inner.__dict__["forward"] is own and replay.replayed == 1


def test_finished_modules_are_the_parts_whose_target_linears_are_all_done():
    block = _Block()
    targets = {block.inner[0], block.out}
    assert finished_modules(block, targets, set()) == []
    assert finished_modules(block, targets, {block.inner[0]}) == [block.inner, block.inner[0]]
    assert set(finished_modules(block, targets, targets)) == {block.inner, block.inner[0], block.out}


def _calibrate(model, samples, replay: bool):
    """Sequential calibration solving each linear by GPTQ (4 bits, groups of 32) from the Hessian it gets."""
    linears = quantizable_linears(model)
    sequence = sequential.SequentialCalibration(model, samples, linears, replay=replay)
    hessians = []
    for group in sequence.groups(Progress("replay", enabled=False), "layers"):
        hessians.append(group.H)
        for linear in group.linears.values():
            result = gptq_quantize(linear.weight.data, group.H, 4, 32, True, 0.01)
            linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
    return sequence, hessians


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_replay_gives_the_bits_of_full_recomputation_and_multiplies_each_sample_once_per_linear(
        dtype, embedded_model_dir):
    cfg = make_config("model=smollm2-135m-4l", f"model.dtype={dtype}", "calibration.nsamples=4",
                      "calibration.seqlen=32")
    fast, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    slow, _ = load_model(cfg.model, "cpu", cfg.cache_dir)
    samples = calibration.build_samples(tokenizer, cfg.calibration)
    with torch.no_grad(), mock.patch.object(nn.Linear, "forward", autospec=True,
                                            side_effect=nn.Linear.forward) as products:
        sequence, fast_h = _calibrate(fast, samples, replay=True)
        fast_products = products.call_count
        products.reset_mock()
        reference, slow_h = _calibrate(slow, samples, replay=False)
        slow_products = products.call_count
    linears, layers = len(quantizable_linears(fast)), 4
    # One grouping pass over one sample per layer, then every linear once per sample.
    assert fast_products == linears + linears * len(samples)
    assert slow_products > 2 * fast_products
    assert sequence.replay.replayed > 0 and reference.replay is None
    assert decoder_checksum(fast) == decoder_checksum(slow)
    assert len(fast_h) == len(slow_h) == 4 * layers and all(torch.equal(a, b) for a, b in zip(fast_h, slow_h))
    assert all(torch.equal(a, b) for a, b in zip(sequence.inputs.hidden, reference.inputs.hidden))


def test_replay_is_skipped_when_a_layer_s_outputs_would_not_fit(embedded_model_dir, monkeypatch):
    cfg = make_config("model=smollm2-135m-4l", "calibration.nsamples=2", "calibration.seqlen=16")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    samples = calibration.build_samples(tokenizer, cfg.calibration)
    monkeypatch.setattr(sequential, "MAX_REPLAY_BYTES", 1000)
    with torch.no_grad():
        sequence, _ = _calibrate(model, samples, replay=True)
    assert sequence.replay.replayed == 0 and sequence.replay.computed == 0
