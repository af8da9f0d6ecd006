"""GPU backends (issue 4): what can be checked without a GPU runs everywhere; the rest skips with its reason.

On CPU: the methods' capabilities and errors (before any model load), backend dispatch, the
random-init model shapes, batched latency, and the report's handling of random-weight runs.
On a CUDA machine with the libraries installed: a real packed quantization of the 4-layer model.
"""
import importlib.util

import pytest
import torch

from sweep.config.schema import ConfigError
from sweep.validation.fields import validate
from sweep.methods import get_method
from conftest import make_config

HAS_CUDA = torch.cuda.is_available()


def errors_of(*overrides):
    with pytest.raises(ConfigError) as info:
        validate(make_config(*overrides))
    return str(info.value)


@pytest.mark.parametrize("bits", [2, 3, 5, 16])
def test_bnb_refuses_bits_other_than_4_and_8(bits):
    message = errors_of("method=bnb", f"bits={bits}")
    assert "method bnb" in message or "bits" in message
    assert "4, 8" in message or "1 to 8" in message


def test_awq_is_4_bit_only_and_names_the_field():
    message = errors_of("method=awq", "bits=3")
    assert "bits=3" in message and "awq" in message and "4" in message


def test_bnb_and_awq_refuse_cpu():
    assert "device=cpu" in errors_of("method=bnb", "bits=4", "device=cpu")
    assert "device=cpu" in errors_of("method=awq", "bits=4", "device=cpu")


def test_gptqmodel_backend_errors_on_cpu_and_bad_kernel():
    message = errors_of("method=gptq", "method.backend=gptqmodel", "device=cpu")
    assert "method.backend='gptqmodel'" in message and "method.backend=torch" in message
    message = errors_of("method=gptq", "method.kernel=gptq_exllama_v2", "bits=3")
    assert "gptq_exllama_v2" in message and "bits=3" in message
    assert "method.kernel='nope'" in errors_of("method=gptq", "method.kernel=nope")


def test_autoround_without_the_library_says_what_to_install(monkeypatch):
    # auto-round is a test dependency: hide it (fault injection) to see the error a user without it gets.
    import sweep.methods.autoround as autoround

    monkeypatch.setattr(autoround, "available", lambda module: module != "auto_round")
    assert "pip install 'auto-round" in errors_of("method=autoround")


def test_autoround_option_errors():
    message = errors_of("method=autoround", "method.iters=-1", "method.export_format=gguf")
    assert "method.iters=-1" in message and "method.export_format='gguf'" in message


def test_autoround_kernel_auto_never_picks_a_kernel_that_compiles_on_cuda():
    """auto-round's own pick on CUDA is GPTQModel's Marlin: minutes of compile per machine, and a SIGSEGV at
    the first forward on the H200 (docs/benchmarks.md, ninth visit). kernel=auto resolves before the reload."""
    from sweep.backends.autoround_backend import kernel_for

    assert kernel_for("auto", "cuda", 4, "auto_round") == "autoround_triton"
    assert kernel_for("auto", "cuda:0", 8, "auto_gptq") == "autoround_triton"
    assert kernel_for("auto", "cuda", 3, "auto_round") == "autoround_torch"   # auto-round's Triton runs 2/4/8
    assert kernel_for("auto", "cpu", 4, "auto_round") == "auto"               # auto-round's pick: its torch kernel
    assert kernel_for("auto", "cuda", 4, "auto_awq") == "auto"                # AWQ packing: its AWQ kernels
    assert kernel_for("autoround_marlin", "cuda", 4, "auto_round") == "autoround_marlin"


def test_autoround_kernel_errors_name_the_bits_device_and_format_allowed():
    message = errors_of("method=autoround", "method.kernel=autoround_triton", "bits=3", "device=cpu")
    assert "bits=3 is not allowed with method.kernel='autoround_triton'" in message and "2, 4, 8" in message
    assert "not allowed with device=cpu" in message
    message = errors_of("method=autoround", "method.kernel=autoround_torch", "method.export_format=auto_awq")
    assert "loads GPTQ-packed exports" in message and "'auto_awq'" in message
    assert "autoround_triton" in errors_of("method=autoround", "method.kernel=marlin")   # the list of kernels
    validate(make_config("method=autoround", "method.kernel=autoround_torch", "bits=3", "device=cpu"))


@pytest.mark.skipif(importlib.util.find_spec("auto_round") is None, reason="needs auto-round (pip install -e '.[test]')")
def test_autoround_kernel_is_the_backend_auto_round_reloads_the_export_on(tmp_path):
    from sweep.data import calibration
    from sweep.infra.progress import Progress
    from sweep.models.loading import load_model

    cfg = make_config("model=smollm2-135m-4l", "method=autoround", "bits=4", "group_size=32", "method.iters=0",
                      "method.kernel=autoround_torch", "calibration.nsamples=4", "calibration.seqlen=64")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    method = get_method("autoround")(cfg)
    method.attach(tokenizer, str(tmp_path))
    report = method.quantize(model, calibration.build_samples(tokenizer, cfg.calibration), Progress("ar", enabled=False))
    assert report.weights == "packed" and report.kernel.startswith("autoround_torch (torch.qlinear_torch"), report.kernel
    assert report.model.config.quantization_config.backend == "torch"   # what auto-round was asked for


def test_gptq_auto_backend_is_torch_without_cuda():
    method = get_method("gptq")(make_config("method=gptq"))
    assert method.resolved_backend("cpu") == "torch"
    with_layer_bits = get_method("gptq")(make_config("method=gptq", "+method.layer_bits={mlp.down_proj: 8}"))
    assert with_layer_bits.resolved_backend("cuda") == "torch"


def test_random_init_needs_an_architecture():
    assert "model.architecture" in errors_of("model.init=random")
    assert "model.init='pretrained_please'" in errors_of("model.init=pretrained_please")


@pytest.mark.parametrize("shape", ["llama-3.1-8b-shape", "llama-3.2-1b-shape", "qwen2.5-0.5b-shape"])
def test_shipped_shapes_have_their_published_sizes(shape):
    """The configs are shaped like the real models: parameter counts within 1% of the published ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    published = {"llama-3.1-8b-shape": 8.03e9, "llama-3.2-1b-shape": 1.236e9, "qwen2.5-0.5b-shape": 0.494e9}
    cfg = make_config(f"model={shape}")
    validate(cfg)
    fields = dict(cfg.model.architecture)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published[shape]) / published[shape] < 0.01, count


def test_random_model_runs_batched_latency(embedded_model_dir):
    """A tiny random-init model end to end through generate() at batch 2: tokens/s counts every sequence."""
    from sweep.config.schema import BenchConfig
    from sweep.measure.latency import measure_latency
    from sweep.models.loading import load_model

    cfg = make_config("model=qwen2.5-0.5b-shape", "model.architecture.num_hidden_layers=1",
                      "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
                      "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    assert sum(p.numel() for p in model.parameters()) < 20e6
    bench = BenchConfig(prompts=["a b c", "the longer prompt of the two"], max_new_tokens=4, warmup=0,
                        repeats=1, batch_size=2)
    results, errors = measure_latency(model, tokenizer, bench)
    assert not errors and set(results) == {"eager"}
    one = BenchConfig(prompts=bench.prompts, max_new_tokens=4, warmup=0, repeats=1, batch_size=1)
    single, _ = measure_latency(model, tokenizer, one)
    assert results["eager"].batch_size == 2 and results["eager"].new_tokens == [4, 4]
    # Same steps, twice the tokens per step: the batched count is per step x 2.
    m = results["eager"].metrics()
    steps_s = sum(r - t for r, t in zip(results["eager"].request_ms, results["eager"].ttft_ms)) / 1000
    assert m["tokens_per_s"] == pytest.approx(2 * 3 * 2 / steps_s)
    assert single["eager"].metrics()["tokens_per_s"] > 0


def test_report_blanks_quality_of_random_weights():
    from types import SimpleNamespace

    from sweep.analysis.table import build_table

    def run(init, ppl):
        tags = {"method": "rtn", "weights": "simulated", "bits": "4", "group_size": "128", "model.init": init,
                "kernel": "none"}
        data = SimpleNamespace(tags=tags, params={}, metrics={"wikitext.word_perplexity": ppl,
                                                              "memory.packed_weights_mb": 10.0})
        info = SimpleNamespace(run_name=f"rtn {init}", status="FINISHED", run_id=init, start_time=0)
        return SimpleNamespace(data=data, info=info)

    df = build_table([run("random", 1e9), run("pretrained", 30.0)])
    by_init = df.set_index("model_init")
    assert by_init.loc["pretrained", "wikitext_word_ppl"] == 30.0
    assert by_init.loc["random", "wikitext_word_ppl"] != by_init.loc["random", "wikitext_word_ppl"]  # NaN
    assert by_init.loc["random", "weight_mb"] == 10.0


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none; run on the GPU machine, docs/benchmarks.md)")
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel (pip install 'gptqmodel>=7.6')")
def test_gptqmodel_packs_and_reloads_on_gpu(embedded_model_dir, tmp_path):
    from sweep.pipeline.run import run_point

    cfg = make_config("model=smollm2-135m-4l", "method=gptq", "bits=4", "group_size=32", "device=cuda",
                      "calibration.nsamples=8", "calibration.seqlen=128", "eval=none", "bench=none",
                      f"tracking.uri=sqlite:///{tmp_path}/m.db")
    result = run_point(cfg)
    assert result.status == "FINISHED", result.error
    assert result.metrics["memory.disk_mb"] > 0 and result.metrics["memory.weights_mb"] > 0


def test_random_init_checks_its_own_architecture_and_needs_only_a_tokenizer(embedded_model_dir, tmp_path,
                                                                            monkeypatch):
    """model.init=random: the path is a tokenizer folder, and group sizes are checked against the
    architecture, not against the tokenizer's source model (SmolLM2's 576 would refuse g128)."""
    import shutil

    from sweep.validation.model_fit import check_against_model

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / name)
    from sweep.config.schema import ConfigError

    cfg = make_config("model=llama-3.2-1b-shape", f"model.path={tmp_path}", "method=rtn")
    monkeypatch.setattr(get_method("rtn"), "ragged_groups", False)  # as for a packed backend
    check_against_model(cfg)  # 2048 and 8192 divide 128: no error
    with pytest.raises(ConfigError, match="group_size=128"):
        check_against_model(make_config("model=smollm2-135m", "method=rtn"))  # 576 does not
    message = errors_of("model=llama-3.2-1b-shape", f"model.path={tmp_path / 'missing'}")
    assert "model.path" in message


def test_layer_bits_of_a_random_shape_are_not_checked_against_the_tokenizer_model(embedded_model_dir):
    """Layer 31 exists in the 8B shape but not in SmolLM2 (30 layers), whose folder supplies only the tokenizer."""
    cfg = make_config("model=llama-3.1-8b-shape", "method=rtn", "+method.layer_bits={layers.31.mlp.down_proj: 8}")
    assert cfg.method["layer_bits"] == {"layers.31.mlp.down_proj": 8}
    assert "layers.31" in errors_of("method=rtn", "+method.layer_bits={layers.31.mlp.down_proj: 8}")


@pytest.mark.skipif(importlib.util.find_spec("auto_round") is None, reason="needs auto-round (pip install -e '.[test]')")
def test_autoround_fake_export_of_a_float32_model_fails_instead_of_reporting_unquantized_quality(tmp_path):
    # 5 bits have no packed auto-round format, so the export is auto-round's "fake" format, which on a
    # float32 model (CPU) writes the original weights back. Found when the reloaded model scored exactly fp32.
    from sweep.data import calibration
    from sweep.models.loading import load_model
    from sweep.infra.progress import Progress

    cfg = make_config("model=smollm2-135m-4l", "model.dtype=float32", "method=autoround", "bits=5", "group_size=32", "method.iters=0",
                      "calibration.nsamples=4", "calibration.seqlen=64")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    method = get_method("autoround")(cfg)
    method.attach(tokenizer, str(tmp_path))
    samples = calibration.build_samples(tokenizer, cfg.calibration)
    with pytest.raises(RuntimeError, match="not quantized"):
        method.quantize(model, samples, Progress("autoround", enabled=False))
