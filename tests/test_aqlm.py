"""method=aqlm (issue 21): the project's AQLM quantizer, aqlm's format and kernels, validation, the CLI.

On CPU, with small settings (AQLM quantizes on a GPU by default; `method.allow_cpu=true` lets these
tests run it here): the quantizer on a real layer with its real calibration inputs (it lowers the
output error it starts from, beats RTN and GPTQ at the same code bits, reproduces per seed); a packed
layer computes what the quantizer's weights compute; every config problem is found before a model
loads; one CLI run reloads the packed checkpoint through transformers onto aqlm's kernels and logs
what it is; and on the full embedded model AQLM 2-bit has a lower perplexity than RTN 2-bit on the
same modules.
"""
from __future__ import annotations

import copy

import mlflow
import pandas as pd
import pytest
import torch

from conftest import make_config, run_report, run_sweep
from sweep.backends import aqlm_backend
from sweep.config.schema import ConfigError
from sweep.data.calibration import build_samples
from sweep.infra.progress import Progress
from sweep.measure.probe import probe_perplexity, probe_tokens
from sweep.methods import get_method
from sweep.models.loading import load_model
from sweep.quant.aqlm import AQLMSettings, aqlm_quantize, reconstruct, relative_error
from sweep.quant.gptq_solver import HessianAccumulator, gptq_quantize
from sweep.quant.grid import qdq_rtn
from sweep.validation.fields import validate
from sweep.validation.model_fit import check_against_model

# Small enough for CI's 2 cores; the defaults (conf/method/aqlm.yaml) search and train longer.
QUICK = ["method=aqlm", "method.allow_cpu=true", "method.rounds=1", "method.beam_size=2", "method.codebook_steps=10"]
QUICK_SETTINGS = dict(rounds=2, beam_size=2, codebook_steps=20, kmeans_iters=5)


def errors_of(*overrides):
    with pytest.raises(ConfigError) as info:
        validate(make_config(*overrides))
    return str(info.value)


# ---- validation, before any model load --------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["method=aqlm", "bits=2", "device=cpu"], "method=aqlm quantizes on a CUDA GPU"),
    (["method=aqlm", "bits=2", "method.allow_cpu=true", "method.num_codebooks=1"],
     "is 1 bits per weight, not bits=2"),
    (["method=aqlm", "bits=3", "method.allow_cpu=true", "method.nbits_per_codebook=16"],
     "bits=3 x in_group_size=8 is not a multiple of nbits_per_codebook=16"),
    (["method=aqlm", "bits=2", "method.allow_cpu=true", "method.nbits_per_codebook=17"], "1 to 16"),
    (["method=aqlm", "bits=2", "method.allow_cpu=true", "+method.layer_bits={mlp.down_proj:4}"],
     "AqlmConfig holds one codebook layout"),
    (["method=aqlm", "bits=2", "method.allow_cpu=true", "quantize_lm_head=true"], "quantize_lm_head=true is not supported"),
    (["method=aqlm", "bits=2", "method.allow_cpu=true", "method.beam_size=0"], "method.beam_size=0"),
])
def test_config_problems_are_found_before_loading(overrides, message):
    assert message in errors_of(*overrides)


def test_an_input_group_that_does_not_tile_the_layers_is_refused_from_the_model_config():
    cfg = make_config(*QUICK, "bits=2", "method.in_group_size=20")   # 5 codebooks: fine as a field
    validate(cfg)
    with pytest.raises(ConfigError, match=r"method.in_group_size=20 does not divide in_features .*allowed here are "
                                          r"1, 2, 4, 8, 16, 32"):
        check_against_model(cfg)


def test_bits_choose_the_number_of_codebooks():
    method = get_method("aqlm")
    for bits, nbits, group, codebooks in [(2, 8, 8, 2), (1, 8, 8, 1), (2, 16, 8, 1), (3, 8, 8, 3), (4, 8, 16, 8)]:
        cfg = make_config(*QUICK, f"bits={bits}", f"method.nbits_per_codebook={nbits}", f"method.in_group_size={group}")
        validate(cfg)
        assert method(cfg).settings(0).num_codebooks == codebooks
        assert method(cfg).settings(0).code_bits == bits


# ---- the quantizer on a real layer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_layer(embedded_model_dir):
    """q_proj of the 4-layer model's layer 1 (float32) and the Hessian of its inputs on WikiText-2 windows."""
    cfg = make_config("model=smollm2-135m-4l", "model.dtype=float32", "calibration.nsamples=16",
                      "calibration.seqlen=128")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    linear = model.model.layers[1].self_attn.q_proj
    acc = HessianAccumulator(linear.in_features, "cpu")
    handle = linear.register_forward_pre_hook(lambda module, args: acc.add(args[0]))
    with torch.no_grad():
        for ids in build_samples(tokenizer, cfg.calibration):
            model(ids)
    handle.remove()
    return linear.weight.data.clone(), acc.H


def test_the_quantizer_lowers_the_output_error_and_beats_rtn_and_gptq_at_the_same_code_bits(real_layer):
    W, H = real_layer
    result = aqlm_quantize(W, H, AQLMSettings(num_codebooks=2, **QUICK_SETTINGS))
    assert result.codes.shape == (W.shape[0], W.shape[1] // 8, 2) and 0 <= result.codes.min() <= result.codes.max() < 256
    assert torch.equal(result.weight, reconstruct(result.codes, result.codebooks, result.scales))
    # Beam search and codebook training improve on the residual k-means they start from.
    assert result.loss < 0.7 * result.initial_loss, (result.initial_loss, result.loss)
    # Under the undamped H of the data: 2 code bits per weight, against 2-bit RTN and GPTQ with groups of 32
    # (which store more: a scale and a zero per 32 weights).
    aqlm = float(relative_error(W, result.weight, H))
    rtn = float(relative_error(W, qdq_rtn(W, 2, 32, False), H))
    gptq = float(relative_error(W, gptq_quantize(W, H, 2, 32, False, 0.01).weight, H))
    assert aqlm < gptq < rtn, (aqlm, gptq, rtn)


def test_the_same_seed_gives_the_same_codes_and_another_seed_other_codes(real_layer):
    W, H = real_layer
    W = W[:128]  # rows are independent: a slice keeps this quick
    settings = AQLMSettings(num_codebooks=2, rounds=1, beam_size=2, codebook_steps=5, kmeans_iters=3)
    first, again = aqlm_quantize(W, H, settings), aqlm_quantize(W, H, settings)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.codebooks, again.codebooks)
    other = aqlm_quantize(W, H, AQLMSettings(**{**settings.__dict__, "seed": 1}))
    assert not torch.equal(first.codes, other.codes)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_packed_layer_computes_what_the_quantizer_reconstructs(real_layer, dtype, tolerance):
    W, H = real_layer
    W = W[:64]
    result = aqlm_quantize(W, H, AQLMSettings(num_codebooks=2, rounds=1, beam_size=1, codebook_steps=0, kmeans_iters=2))
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=True)
    packed = aqlm_backend.packed_linear(linear, result.codes, result.codebooks, result.scales, 8, dtype)
    assert aqlm_backend.use_kernels(torch.nn.Sequential(packed), "cpu") == "aqlm dequantize_gemm (CPU) (1 layers)"
    x = torch.randn(5, W.shape[1])
    expected = x @ result.weight.T + linear.bias.data
    got = packed(x.to(dtype)).float()
    assert (got - expected).abs().max() / expected.abs().max() < tolerance
    # codes at 8 bits each (2 per 8 weights), 2 codebooks of 256 x 8 values and a scale per row, in `dtype`
    weights = W.numel()
    element = torch.finfo(dtype).bits
    assert aqlm_backend.storage_bits(packed) == pytest.approx(
        (weights * 2 + 2 * 256 * 8 * element + W.shape[0] * element) / weights)


# ---- through the CLI: packed, saved, reloaded by transformers, logged ---------------------------------

def test_a_cli_run_reloads_the_checkpoint_onto_aqlm_kernels_and_logs_it(tmp_path, embedded_model_dir):
    # Layer 0's attention only: the 4-layer model's quality is not the point here (see the next test).
    proc = run_sweep(tmp_path, "aqlm", *QUICK, "bits=2", "baseline=false",
                     "+method.layer_bits={model.*:16,layers.0.self_attn.*:2}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("method") == "aqlm"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags, metrics = runs[0].data.tags, runs[0].data.metrics
    assert tags["weights"] == "packed" and tags["backend"] == "sweep-aqlm"
    assert tags["kernel"] == "aqlm dequantize_gemm (CPU) (4 layers)"
    assert tags["group_size"] == "8" and tags["aqlm.layout"] == "2x8 (codebooks x bits), groups of 8"
    assert metrics["quant.layers"] == 4 and metrics["quant.aqlm_num_codebooks"] == 2
    assert metrics["quant.reload_logit_error"] < 0.05
    assert metrics["memory.disk_mb"] > 0 and metrics["wikitext.word_perplexity"] > 1
    # 2 code bits per weight plus codebooks and scales on the 4 quantized modules; the rest at 16 bits.
    assert 2 < metrics["quant.bits_per_weight"] < 16
    report = run_report(tmp_path, tmp_path / "report")
    assert report.returncode == 0, report.stdout
    csv = next(p for p in (tmp_path / "report").glob("sweep-*.csv") if not p.stem.endswith("-runs"))
    row = pd.read_csv(csv).set_index("method").loc["aqlm"]
    assert row["weights"] == "packed" and row["kernel"].startswith("aqlm dequantize_gemm")


# ---- quality on the full embedded model --------------------------------------------------------------

def test_probe_perplexity_aqlm_2bit_below_rtn_2bit_on_the_same_modules(embedded_model_dir, tmp_path):
    """AQLM claims usable 2-bit weights where round-to-nearest breaks down. Quantizing the MLP of one
    middle layer (the rest kept: the whole model takes most of an hour on these cores), the probe
    perplexity orders fp16 < AQLM 2-bit < RTN 2-bit (g128). (Measured: 30.4 < 31.7 < 34.9; with layers
    10 and 11 and the default settings 30.4 < 39.0 < 47.4, GPTQ g128 41.1: docs/benchmarks.md.)"""
    keep = "+method.layer_bits={model.*:16,layers.10.mlp.*:2}"
    base_cfg = make_config("model=smollm2-135m")
    base, tokenizer = load_model(base_cfg.model, "cpu", base_cfg.cache_dir)
    tokens = probe_tokens(tokenizer, [2, 3], 1024)
    ppl = {"fp16": probe_perplexity(base, tokens, 512)}
    for label, overrides in {"rtn2": ["method=rtn", "group_size=128"], "aqlm2": QUICK}.items():
        cfg = make_config("model=smollm2-135m", "bits=2", "calibration.nsamples=32", "calibration.seqlen=256", keep,
                          *overrides)
        method = get_method(cfg.method_name)(cfg)
        method.attach(tokenizer, str(tmp_path / label))
        model = copy.deepcopy(base)
        report = method.quantize(model, build_samples(tokenizer, cfg.calibration), Progress(label, enabled=False))
        ppl[label] = probe_perplexity(report.model or model, tokens, 512)
    assert ppl["fp16"] < ppl["aqlm2"] < ppl["rtn2"], ppl
