"""bench.mode=graph: the engine-style decode loop (sweep/measure/latency.py) against generate().

On CPU the step runs eagerly (no CUDA graphs), which still checks the loop itself: its static
cache, positions, padding mask and EOS handling must give exactly generate()'s greedy tokens.
Its speed on the GPU is in docs/benchmarks.md.
"""
import pytest

from sweep.config.schema import BenchConfig, ConfigError
from sweep.validation.fields import validate
from sweep.measure.latency import measure_latency
from sweep.models.loading import load_model
from conftest import make_config

PROMPTS = ["Write a short poem about the sea.", "Hi", "What is the capital of France?"]


@pytest.fixture(scope="module")
def small_model(embedded_model_dir):
    cfg = make_config("model=smollm2-135m-4l", "model.dtype=float32")  # the loop's logic, not bf16 rounding
    return load_model(cfg.model, "cpu", cfg.cache_dir)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_graph_mode_decodes_the_same_tokens_as_generate(small_model, batch_size):
    model, tokenizer = small_model
    bench = BenchConfig(prompts=PROMPTS, max_new_tokens=10, warmup=0, repeats=1, batch_size=batch_size, mode="all")
    results, errors = measure_latency(model, tokenizer, bench)
    assert not errors and set(results) == {"eager", "static", "graph"}
    graph, eager = results["graph"], results["eager"]
    # at batch 2 the second and third prompts are the shorter row of a left-padded batch
    assert [s["completion"] for s in graph.samples] == [s["completion"] for s in eager.samples]
    assert graph.new_tokens == [10] * len(PROMPTS)
    assert len(graph.itl_ms) == len(PROMPTS) * (10 - 2)  # one interval per decode step after the first
    metrics = graph.metrics()
    assert metrics["compiled"] == 0.0  # CUDA graphs only on CUDA
    assert metrics["tokens_per_s"] > 0 and metrics["ttft_ms_p50"] < metrics["request_ms_p50"]


def test_bench_modes_are_validated_with_the_allowed_values():
    validate(make_config("bench.mode=graph"))
    with pytest.raises(ConfigError) as info:
        validate(make_config("bench.mode=engine"))
    assert "bench.mode" in str(info.value) and "graph" in str(info.value) and "all" in str(info.value)
