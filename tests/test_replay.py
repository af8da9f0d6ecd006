"""Sequential calibration computes each finished part of a layer once (sweep/quant/replay.py), and the
result is the same bits as computing it on every pass."""
from __future__ import annotations

import contextlib
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
from sweep.quant.layers import LayerInputs, run_layer_until
from sweep.quant.replay import OutputReplay, finished_modules, untargeted_children


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
    with replay.running(block, [block.inner]):
        first = [block(h)[0] for h in x]
    with replay.running(block, [block.inner]):
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
        with replay.running(block, [block.inner]):
            got = [block(h)[0] for h in x]
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert replay.replayed == 0 and replay.computed == 6
    plain = _Block()
    with replay.running(plain, [plain.inner]):
        plain(x[0])
    with replay.running(plain, [plain.inner]):
        plain(torch.randn(5, 8))   # another shape than recorded: computed
    assert replay.replayed == 0


def test_an_instance_level_forward_is_put_back_after_replay():
    block, x = _Block(), torch.randn(2, 8)
    wrapped = block.inner.forward
    block.inner.forward = lambda h: wrapped(h)    # what accelerate's hooks do
    own = block.inner.__dict__["forward"]
    replay = OutputReplay()
    for _ in range(2):
        with replay.running(block, [block.inner]):
            block(x)
    assert block.inner.__dict__["forward"] is own and replay.replayed == 1


def test_finished_modules_are_the_parts_whose_target_linears_are_all_done():
    block = _Block()
    targets = {block.inner[0], block.out}
    assert finished_modules(block, targets, set()) == []
    assert finished_modules(block, targets, {block.inner[0]}) == [block.inner, block.inner[0]]
    assert set(finished_modules(block, targets, targets)) == {block.inner, block.inner[0], block.out}


class _SharedNorm(nn.Module):
    """One norm instance called twice per sample with a linear between its calls, and a third linear that
    runs before the norm on the samples `route_first` picks (data-dependent control flow, as in a mixture
    of experts)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.routed = nn.Linear(8, 8)
        self.route_first: set = set()

    def forward(self, x):
        if float(x[0, 0]) in self.route_first:
            x = x + self.routed(x)
        h = self.first(self.norm(x))
        return self.second(self.norm(h + x))


def _run_until(layer, hidden, stop, replay=None, finished=()):
    """Each sample run until `stop` starts, as a calibration pass does; returns the inputs `stop` received."""
    seen = []
    handle = stop.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    targets = {layer.first, layer.second, layer.routed}
    context = replay.running(layer, [layer.norm, *finished], unfinished=targets - set(finished)) if replay \
        else contextlib.nullcontext()
    try:
        with torch.no_grad(), context:
            run_layer_until(layer, LayerInputs(hidden=hidden, kwargs=[{}] * len(hidden)), [stop])
    finally:
        handle.remove()
    return seen


def test_a_part_called_twice_per_sample_is_replayed_per_sample_and_call_even_when_a_pass_stopped_between():
    # The first pass stops at `first`: the norm's first call of each sample is recorded, its second is not
    # reached. The next pass replays the first call and computes the second; a record list shared by all
    # samples would hand sample 0's second call sample 1's first output (the same shape).
    torch.manual_seed(0)
    layer, hidden = _SharedNorm(), [torch.randn(3, 8) for _ in range(4)]
    replay = OutputReplay()
    _run_until(layer, hidden, layer.first, replay)
    assert (replay.computed, replay.replayed) == (4, 0)
    with torch.no_grad():
        layer.first.weight.mul_(0.5)   # "quantized" between the passes
    want = _run_until(layer, hidden, layer.second)
    got = _run_until(layer, hidden, layer.second, replay, finished=[layer.first])
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(want, got))
    assert replay.replayed == 4   # the first calls; the second calls computed


def test_a_part_that_ran_after_a_linear_not_yet_quantized_is_not_recorded():
    # On the samples routed through `routed` first, the norm's input depends on `routed`, not yet quantized
    # in the first pass: recording that output would replay it after `routed` has changed.
    torch.manual_seed(0)
    layer, hidden = _SharedNorm(), [torch.randn(3, 8) for _ in range(4)]
    layer.route_first = {float(hidden[1][0, 0]), float(hidden[3][0, 0])}
    replay = OutputReplay()
    _run_until(layer, hidden, layer.first, replay)
    with torch.no_grad():
        layer.routed.weight.mul_(0.5)
        layer.first.weight.mul_(0.5)
    want = _run_until(layer, hidden, layer.second)
    got = _run_until(layer, hidden, layer.second, replay, finished=[layer.first])
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(want, got))
    assert replay.replayed == 2   # samples 0 and 2 only


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
    layer = fast.model.layers[0]
    assert untargeted_children(layer, set(quantizable_linears(fast).values())) == [layer.input_layernorm,
                                                                                   layer.post_attention_layernorm]
    norm_class = type(layer.input_layernorm)
    with torch.no_grad(), mock.patch.object(nn.Linear, "forward", autospec=True,
                                            side_effect=nn.Linear.forward) as products, \
            mock.patch.object(norm_class, "forward", autospec=True, side_effect=norm_class.forward) as norms:
        sequence, fast_h = _calibrate(fast, samples, replay=True)
        fast_products, fast_norms = products.call_count, norms.call_count
        products.reset_mock()
        norms.reset_mock()
        reference, slow_h = _calibrate(slow, samples, replay=False)
        slow_products, slow_norms = products.call_count, norms.call_count
    linears, layers = len(quantizable_linears(fast)), 4
    # One grouping pass over one sample per layer, then every linear once per sample; the same for both norms.
    assert fast_products == linears + linears * len(samples)
    assert slow_products > 2 * fast_products
    assert fast_norms == 2 * layers * (1 + len(samples)) and slow_norms == 2 * layers + 8 * layers * len(samples)
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


class _PartTwice(nn.Module):
    """A part holding a target linear, called twice per sample with another target linear between its calls."""

    def __init__(self):
        super().__init__()
        self.part = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.gate = nn.Linear(8, 8)

    def forward(self, x):
        return self.part(self.gate(self.part(x)))


def test_a_replayed_part_s_own_linears_are_not_replayed_on_a_later_call_of_that_part():
    # The gate's pass records the part's first call, and the part's linear inside it, then stops at the gate.
    # The output pass replays the part's first call (its linear is not called) and computes the second; the
    # linear's first record there is from the part's first call, not this one, and must not be replayed.
    torch.manual_seed(0)
    layer, hidden = _PartTwice(), [torch.randn(3, 8) for _ in range(3)]
    linear, targets = layer.part[0], {layer.part[0], layer.gate}
    inputs = LayerInputs(hidden=hidden, kwargs=[{}] * 3)
    replay = OutputReplay()
    with torch.no_grad():
        with replay.running(layer, [layer.part, linear], unfinished={layer.gate}):
            run_layer_until(layer, inputs, [layer.gate])
        want = [layer(h) for h in hidden]
        with replay.running(layer, [layer.part, linear, layer.gate]):
            got = [layer(h) for h in hidden]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert replay.replayed == 3   # the part's first calls only
