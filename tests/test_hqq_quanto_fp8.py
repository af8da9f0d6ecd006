"""method=hqq, method=quanto, method=fp8 (issue 21): validation, real quantization, reload, quality, the CLI.

On CPU: every capability check before a model loads; real quantization of the 4-layer model (packed
module types, measured bits per weight, the saved checkpoint reloaded to the same logits, fidelity to
the unquantized model falling with the bits); on the full embedded model, token perplexity on a
WikiText-2 probe against RTN at the same bits; one CLI sweep read back by the report. The FP8 tensor-core
path, hqq's int4 kernel on CUDA and quanto's float8 weights need a CUDA GPU and skip, saying so, elsewhere.
"""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from conftest import make_config, run_report, run_sweep
from sweep.backends.fp8_linear import Fp8DynamicLinear, Fp8WeightOnlyLinear, has_fp8_tensor_cores
from sweep.config.schema import ConfigError
from sweep.infra.progress import Progress
from sweep.measure.memory import MB, weight_footprint_mb
from sweep.measure.probe import probe_perplexity, probe_tokens
from sweep.methods import get_method
from sweep.methods.base import PACKED, SIMULATED
from sweep.models.loading import load_model
from sweep.quant.fp8 import FP8_DTYPE, quantize_weight
from sweep.quant.layers import quantizable_linears
from sweep.validation.fields import validate

FP8_GPU = torch.cuda.is_available() and has_fp8_tensor_cores("cuda")
NO_FP8_GPU = "needs a CUDA GPU with FP8 tensor cores (capability >= 8.9, e.g. H200); CI has none"


def errors_of(*overrides):
    with pytest.raises(ConfigError) as info:
        validate(make_config(*overrides))
    return str(info.value)


# ---- validation, before any model load --------------------------------------------------------------

def test_the_issue_grid_validates():
    for method in ("rtn", "hqq", "quanto"):
        make_config(f"method={method}", "bits=4")   # the default group_size=128 included
    # On CPU the graph loop runs uncompiled, so quanto may be timed in it there.
    validate(make_config("method=quanto", "bits=4", "bench.mode=graph", "device=cpu"))


@pytest.mark.parametrize("overrides, message", [
    (["method=hqq", "bits=7"], "bits=7 is not allowed for method hqq: it supports 1, 2, 3, 4, 5, 6, 8"),
    (["method=hqq", "group_size=12"], "group_size=12 is not allowed for method hqq: -1 (one group per row) or a multiple of 8"),
    (["method=hqq", "method.axis=2"], "method.axis=2"),
    (["method=hqq", "method.kernel=tinygemm_int4", "bits=3"], "method.kernel='tinygemm_int4' needs bits=4, method.axis=1"),
    (["method=hqq", "method.kernel=tinygemm_int4", "bits=4", "group_size=48"], "group_size one of 32, 64, 128, 256"),
    (["method=hqq", "+method.layer_bits={mlp.down_proj:7}"], "bits=7 is not allowed for method hqq"),
    (["method=quanto", "bits=3"], "bits=3 is not allowed for method quanto: it supports 2, 4, 8"),
    (["method=quanto", "bits=8", "method.weights=float8", "device=cpu"], "quanto's float8 weights are offered on CUDA"),
    (["method=quanto", "bits=4", "method.weights=float8"], "method.weights='float8' needs bits=8"),
    (["method=quanto", "+method.layer_bits={mlp.down_proj:3}"], "bits=3 is not allowed for method quanto"),
    (["method=quanto", "bits=4", "bench.mode=graph", "device=cuda"],
     "bench.mode='graph' is not allowed with method=quanto on CUDA: optimum-quanto 0.2.7's packed weights do not compile"),
    (["method=fp8", "bits=4"], "bits=4 is not allowed for method fp8: it supports 8"),
    (["method=fp8", "bits=8", "method.activations=dynamic"], "needs group_size=-1"),
    (["method=fp8", "bits=8", "method.activations=static"], "method.activations='static' is not allowed"),
    (["method=fp8", "bits=8", "+method.layer_bits={mlp.down_proj:4}"], "bits=4 is not allowed for method fp8"),
])
def test_capabilities_are_checked_before_loading(overrides, message):
    assert message in errors_of(*overrides)


@pytest.mark.parametrize("method, module, package", [("hqq", "hqq", "hqq"), ("quanto", "optimum.quanto", "optimum-quanto")])
def test_a_missing_library_names_the_package_and_the_extra(monkeypatch, method, module, package):
    # Both are test dependencies: hide one (fault injection) to see what a user without it is told.
    import importlib

    methods_module = importlib.import_module(f"sweep.methods.{method}")
    monkeypatch.setattr(methods_module, "available", lambda name: name != module)
    message = errors_of(f"method={method}", "bits=4")
    assert f"needs {package}" in message and ".[quant]" in message


# ---- real quantization of the 4-layer model ---------------------------------------------------------

@pytest.fixture(scope="module")
def small(embedded_model_dir):
    """The 4-layer model as loaded, its probe tokens and the unquantized next-token log-probabilities."""
    cfg = make_config("model=smollm2-135m-4l")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    tokens = probe_tokens(tokenizer, [2], 256).unsqueeze(0)
    with torch.no_grad():
        reference = torch.log_softmax(model(tokens).logits.float(), -1)
    return model, tokenizer, tokens, reference


def quantized(small, tmp_path, *overrides):
    """(model, report) of one method on a fresh copy of the 4-layer model, saved to tmp_path."""
    model, tokenizer, _, _ = small
    cfg = make_config("model=smollm2-135m-4l", *overrides)
    method = get_method(cfg.method_name)(cfg)
    method.attach(tokenizer, str(tmp_path))
    copy_ = copy.deepcopy(model)
    return copy_, method.quantize(copy_, None, Progress("test", enabled=False))


def kl_from_reference(model, small) -> float:
    """Mean KL(unquantized || quantized) of next-token distributions on the probe: fidelity that means
    something even on the cut 4-layer model, whose perplexity is in the billions."""
    _, _, tokens, reference = small
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), -1)
    return float((reference.exp() * (reference - logp)).sum(-1).mean())


def reloaded_logits(small, saved_dir, load_into):
    model, _, tokens, _ = small
    fresh = load_into(copy.deepcopy(model), saved_dir)
    with torch.no_grad():
        return fresh(tokens).logits


@pytest.mark.parametrize("method, load_module, module_class", [
    ("hqq", "sweep.backends.hqq_backend", "HQQLinear"),
    ("quanto", "sweep.backends.quanto_backend", "QLinear"),
])
def test_packed_4bit_modules_sizes_and_reload(small, tmp_path, method, load_module, module_class):
    import importlib

    model, report = quantized(small, tmp_path, f"method={method}", "bits=4", "group_size=64")
    targets = quantizable_linears(small[0])
    assert report.weights == PACKED and report.kernel.startswith(method if method == "hqq" else "quanto")
    assert {type(model.get_submodule(name)).__name__ for name in targets} == {module_class}
    # Measured bits per weight: 4-bit codes plus per-64-weight scales (and zeros/shifts) in the model's dtype.
    dtype_bits = torch.finfo(small[0].dtype).bits
    for record in report.layers.values():
        assert record["storage_bits"] == pytest.approx(4 + 2 * dtype_bits / 64)
    # The footprint fell by what the records say the packed linears weigh instead of the originals.
    packed_bytes = sum(r["storage_bits"] * r["in_features"] * r["out_features"] / 8 for r in report.layers.values())
    original_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    saved = weight_footprint_mb(small[0]) - weight_footprint_mb(model, report.unregistered_weight_bytes)
    assert saved == pytest.approx((original_bytes - packed_bytes) / MB, rel=1e-3)
    # The checkpoint on disk gives back the same model.
    with torch.no_grad():
        logits = model(small[2]).logits
    load_into = importlib.import_module(load_module).load_into
    assert torch.equal(reloaded_logits(small, report.saved_dir, load_into), logits)


@pytest.fixture(scope="module")
def hqq_tinygemm_unfused(small, tmp_path_factory):
    """hqq 4-bit g64 on tinygemm, one int4 matmul per linear: (model, report), shared by the tests that
    only run it."""
    return quantized(small, tmp_path_factory.mktemp("tinygemm"), "method=hqq", "bits=4", "group_size=64",
                     "method.kernel=tinygemm_int4", "method.fuse_projections=false")


def test_hqq_on_tinygemm_computes_what_hqq_computes(small, hqq_tinygemm_unfused, tmp_path):
    """hqq's codes, scales and zeros repacked for torch's int4 matmul (its CPU layout here, the CUDA one on a
    GPU): the same logits as hqq's own dequantize-then-matmul, up to tinygemm's bfloat16 scales."""
    reference, _ = quantized(small, tmp_path / "pytorch", "method=hqq", "bits=4", "group_size=64")
    model, report = hqq_tinygemm_unfused
    targets = quantizable_linears(small[0])
    assert report.kernel.startswith("tinygemm_int4") and f"({len(targets)} layers)" in report.kernel
    assert {type(model.get_submodule(name)).__name__ for name in targets} == {"TinyGemmInt4Linear"}
    with torch.no_grad():
        expected, got = reference(small[2]).logits.float(), model(small[2]).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    # A mismatch in the repacking (a zero point read off by one) would move every logit.
    assert kl_from_reference(model, small) == pytest.approx(kl_from_reference(reference, small), rel=0.1)


def test_hqq_on_tinygemm_fuses_qkv_and_gate_up_without_changing_the_logits(small, hqq_tinygemm_unfused, tmp_path):
    """The default on tinygemm: one int4 matmul for q/k/v and one for gate/up per layer, as GPTQ's."""
    separate, _ = hqq_tinygemm_unfused
    model, report = quantized(small, tmp_path / "fused", "method=hqq", "bits=4", "group_size=64",
                              "method.kernel=tinygemm_int4")
    layers = len(model.model.layers)
    assert report.tags["fused_projections"] == f"q/k/v in {layers} attentions, gate/up in {layers} MLPs"
    assert {type(layer.mlp).__name__ for layer in model.model.layers} == {"FusedGatedMLP"}
    assert {type(layer.self_attn.q_proj).__name__ for layer in model.model.layers} == {"FusedQKVProjection"}
    with torch.no_grad():
        expected, got = separate(small[2]).logits.float(), model(small[2]).logits.float()
    # Each output column keeps its codes, scales and reduction: the same logits up to the kernel's tiling.
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.parametrize("method, bit_widths", [("hqq", (2, 3, 4, 8)), ("quanto", (2, 4, 8))])
def test_fidelity_falls_with_the_bits(small, tmp_path, method, bit_widths):
    kl = {bits: kl_from_reference(quantized(small, tmp_path / str(bits), f"method={method}", f"bits={bits}")[0], small)
          for bits in bit_widths}
    ordered = [kl[b] for b in sorted(bit_widths, reverse=True)]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1], kl


def test_quanto_steps_a_group_size_that_does_not_divide_down_and_says_so(small, tmp_path):
    _, report = quantized(small, tmp_path, "method=quanto", "bits=4", "group_size=128")
    sizes = {(r["in_features"], r["group_size"]) for r in report.layers.values()}
    assert sizes == {(576, 96), (1536, 128)}   # 576 = hidden size: 128 and not 96 leave a remainder
    assert any("in_features 576" in note and "groups of 96" in note for note in report.notes)


def test_fp8_on_cpu_is_simulated_through_float8(small, tmp_path):
    if FP8_GPU:
        pytest.skip("this machine packs FP8: the simulated path is for machines without FP8 tensor cores")
    weights_only, report = quantized(small, tmp_path / "w8a16", "method=fp8", "bits=8", "group_size=-1")
    assert report.weights == SIMULATED and report.kernel == "none" and "simulated" in report.notes[0]
    name, linear = next(iter(quantizable_linears(weights_only).items()))
    original = small[0].get_submodule(name).weight.data
    # Every weight is an e4m3 code times its row's scale: quantizing the simulated weight again changes nothing.
    codes, scales = quantize_weight(linear.weight.data, -1)
    again = (codes.float() * scales).to(original.dtype)
    assert codes.dtype == FP8_DTYPE and torch.equal(again, linear.weight.data)
    assert not torch.equal(linear.weight.data, original)
    assert report.layers[name]["storage_bits"] == pytest.approx(8 + 32 / original.shape[1])
    # W8A8 also rounds each linear's input per token: same weights, other outputs, still close.
    both, _ = quantized(small, tmp_path / "w8a8", "method=fp8", "bits=8", "group_size=-1", "method.activations=dynamic")
    assert torch.equal(both.get_submodule(name).weight.data, linear.weight.data)
    kl_weights, kl_both = kl_from_reference(weights_only, small), kl_from_reference(both, small)
    assert 0 < kl_weights < kl_both < 10 * kl_weights, (kl_weights, kl_both)


# ---- quality on the full embedded model (token perplexity on a WikiText-2 probe) ----------------------

def test_probe_perplexity_against_rtn_at_the_same_bits(embedded_model_dir):
    """HQQ claims better quality than RTN at equal bits: at 4 bits, groups of 128, it has it here. FP8's
    8-bit weights stay next to the unquantized model; quanto's 4-bit min/max grid is a quantized model
    (worse than fp16), and no better than HQQ's fitted zero points."""
    cfg = make_config("model=smollm2-135m")
    base, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    tokens = probe_tokens(tokenizer, [2, 3], 1024)
    ppl = {"fp16": probe_perplexity(base, tokens, 512)}
    for label, overrides in {"rtn4": ["method=rtn", "bits=4"], "hqq4": ["method=hqq", "bits=4"],
                             "quanto4": ["method=quanto", "bits=4"], "fp8": ["method=fp8", "bits=8"]}.items():
        run_cfg = make_config("model=smollm2-135m", "group_size=128", *overrides)
        model = copy.deepcopy(base)
        get_method(run_cfg.method_name)(run_cfg).quantize(model, None, Progress(label, enabled=False))
        ppl[label] = probe_perplexity(model, tokens, 512)
    assert ppl["fp16"] < ppl["hqq4"] < ppl["rtn4"], ppl
    assert ppl["fp16"] < ppl["quanto4"] and ppl["hqq4"] < ppl["quanto4"], ppl
    assert ppl["fp16"] <= ppl["fp8"] < ppl["hqq4"] and ppl["fp8"] < 1.05 * ppl["fp16"], ppl


# ---- through the CLI and the report -----------------------------------------------------------------

def test_hqq_and_quanto_sweep_reads_back_in_the_report(tmp_path, embedded_model_dir):
    # Packed runs are timed (8 new tokens keep that short); the baseline is not needed to read them back.
    proc = run_sweep(tmp_path, "sweep", "method=hqq,quanto", "bits=4", "baseline=false", "bench.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = run_report(tmp_path, tmp_path / "report")
    assert report.returncode == 0, report.stdout
    csv = next(p for p in (tmp_path / "report").glob("sweep-*.csv") if not p.stem.endswith("-runs"))
    rows = pd.read_csv(csv).set_index("method")
    assert set(rows.index) == {"hqq", "quanto"}
    assert set(rows["weights"]) == {PACKED}
    assert rows.loc["hqq", "kernel"].startswith("hqq pytorch") and "quanto" in rows.loc["quanto", "kernel"]
    # avg_bits counts the scales and zeros: above 4, below 4 + two fp16 values per 32 weights.
    assert ((rows["avg_bits"] > 4) & (rows["avg_bits"] < 5)).all(), rows["avg_bits"]
    assert rows["wikitext_word_ppl"].notna().all() and rows["weight_mb"].notna().all()


# ---- GPU paths: skipped, with the reason, where there is no such GPU ----------------------------------

@pytest.mark.skipif(not FP8_GPU, reason=NO_FP8_GPU)
@pytest.mark.parametrize("cls, group_size", [(Fp8WeightOnlyLinear, -1), (Fp8WeightOnlyLinear, 64),
                                             (Fp8DynamicLinear, -1)])
def test_packed_fp8_linears_on_the_gpu(cls, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192, bias=True).to("cuda", torch.bfloat16)
    packed = cls(linear, group_size)
    x = torch.randn(4, 7, 576, device="cuda", dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x, packed.dequantized_weight(torch.bfloat16), linear.bias)
    out = packed(x)
    assert out.shape == reference.shape and packed.weight_fp8.dtype == FP8_DTYPE
    # Weight-only is the dequantized matmul; W8A8 adds the activations' FP8 rounding (a few percent).
    tolerance = 0.01 if cls is Fp8WeightOnlyLinear else 0.08
    assert float((out - reference).norm() / reference.norm()) < tolerance


@pytest.mark.skipif(not FP8_GPU, reason=NO_FP8_GPU)
def test_fp8_method_packs_on_the_gpu(embedded_model_dir):
    cfg = make_config("model=smollm2-135m-4l", "method=fp8", "bits=8", "group_size=-1", "method.activations=dynamic")
    model, _ = load_model(cfg.model, "cuda", cfg.cache_dir)
    report = get_method("fp8")(cfg).quantize(model, None, Progress("fp8", enabled=False))
    assert report.weights == PACKED and "Fp8DynamicLinear" in report.kernel
    assert all(isinstance(model.get_submodule(n), Fp8DynamicLinear) for n in report.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): hqq on tinygemm's CUDA layout")
def test_hqq_tinygemm_int4_on_the_gpu(embedded_model_dir, tmp_path):
    cfg = make_config("model=smollm2-135m-4l", "method=hqq", "bits=4", "group_size=64", "model.dtype=bfloat16")
    model, tokenizer = load_model(cfg.model, "cuda", cfg.cache_dir)
    method = get_method("hqq")(cfg)
    method.attach(tokenizer, str(tmp_path))
    report = method.quantize(model, None, Progress("hqq", enabled=False))
    assert "tinygemm_int4" in report.kernel
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device="cuda")
    assert torch.isfinite(model(tokens).logits).all()
