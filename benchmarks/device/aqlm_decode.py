"""AQLM's kernels in the 8B shape's batch-1 decode (issue 21, item 6), without an hour of quantization.

A step's time depends on the layout (codebooks x bits per codebook, groups of 8) and on the shapes, not on
which codes the quantizer found, so every decoder linear of the random-weight 8B shape (bfloat16) becomes
aqlm's `QuantizedLinear` holding random codes, built by the same `sweep.backends.aqlm_backend.packed_linear`
that `method=aqlm` packs its results with. sweep's own graph loop (`bench.mode=graph`: static KV cache, the
decode step replayed as a CUDA graph) then times it, as `python -m sweep ... bench.mode=graph bench.repeats=1`
would, and the bfloat16 model first, for the ratio in the same process. Layouts: 2x8 (`method=aqlm bits=2`,
aqlm's CUDA `code2x8` kernel), 1x16 (AQLM's published 2-bit layout, `code1x16`) and 4x8 (`bits=4`: no CUDA
kernel, aqlm's Triton matmul). Codebook entries are scaled so that the layers' weights have the model
initializer's spread (activations stay finite); the tokens generated are meaningless.

Usage (inside a device `run`, after `. benchmarks/device/setup.sh`):
    python3 benchmarks/device/aqlm_decode.py            # writes $OUT/aqlm_decode.json
"""
from __future__ import annotations

import json
import os
import time
import traceback

import torch
from omegaconf import OmegaConf

from sweep.backends import aqlm_backend
from sweep.config.schema import BenchConfig, ModelConfig
from sweep.measure.latency import bandwidth_fraction, device_bandwidth_gbps, measure_latency
from sweep.measure.memory import decode_read_mb
from sweep.models.loading import load_model
from sweep.quant.layers import quantizable_linears

LAYOUTS = {"2x8": (2, 8), "1x16": (1, 16), "4x8": (4, 8)}   # (codebooks, bits per codebook), groups of 8
IN_GROUP = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_config() -> ModelConfig:
    """conf/model/llama-3.1-8b-shape.yaml, its tokenizer from setup.sh's carried copy when there is one."""
    fields = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/model/llama-3.1-8b-shape.yaml")))
    tokenizer = os.path.join(os.environ.get("STATE", ""), "tok")
    if os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        fields["path"] = tokenizer
    return ModelConfig(**fields)


def bench_config() -> BenchConfig:
    """conf/bench/gpu.yaml with stage.sh's 8B settings: one warm-up, one repeat, the graph loop only."""
    fields = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/bench/gpu.yaml")))
    fields.update(warmup=1, repeats=1, mode="graph", disk_size=False)
    return BenchConfig(**fields)


def to_aqlm(model: torch.nn.Module, num_codebooks: int, nbits: int, device: str = "cuda") -> None:
    """Every decoder linear (not the head) replaced by a QuantizedLinear with random codes, in place."""
    generator = torch.Generator(device=device).manual_seed(0)
    for name, linear in quantizable_linears(model).items():
        out_f, in_f = linear.out_features, linear.in_features
        codes = torch.randint(0, 2 ** nbits, (out_f, in_f // IN_GROUP, num_codebooks), device=device,
                              generator=generator)
        # The sum of num_codebooks entries has the initializer's std (0.02) with unit scales.
        codebooks = torch.randn(num_codebooks, 2 ** nbits, IN_GROUP, device=device, generator=generator)
        codebooks *= 0.02 / num_codebooks ** 0.5
        scales = torch.ones(out_f, device=device)
        packed = aqlm_backend.packed_linear(linear, codes, codebooks, scales, nbits, torch.bfloat16)
        model.set_submodule(name, packed)
        del linear, codes
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(model, tokenizer, bench: BenchConfig) -> dict:
    latencies, errors = measure_latency(model, tokenizer, bench)
    row = {"errors": errors, "decode_read_mb": round(decode_read_mb(model), 1)}
    graph = latencies.get("graph")
    if graph is not None:
        metrics = graph.metrics()
        row.update(tokens_per_s=round(metrics["tokens_per_s"], 2), itl_ms_p50=round(metrics["itl_ms_p50"], 3),
                   bandwidth_fraction=round(bandwidth_fraction(row["decode_read_mb"], metrics["tokens_per_s"]), 3))
    return row


def main() -> None:
    bench = bench_config()
    results = {"device": torch.cuda.get_device_name(), "bandwidth_gbps": device_bandwidth_gbps(),
               "torch": torch.__version__, "bench": {"max_new_tokens": bench.max_new_tokens,
                                                     "prompts": len(bench.prompts)}}
    out = os.environ.get("OUT")
    for layout in ("bf16",) + tuple(LAYOUTS):
        start = time.perf_counter()
        row = {}
        try:
            model, tokenizer = load_model(model_config(), "cuda", os.environ.get("SWEEP_CACHE", "~/.cache/sweep"))
            if layout != "bf16":
                to_aqlm(model, *LAYOUTS[layout])
                first = next(m for m in model.modules() if type(m).__name__ == "QuantizedLinear")
                row["kernel"] = aqlm_backend.kernel_name(first, "cuda")
                row["storage_bits"] = round(aqlm_backend.storage_bits(first), 3)
            row.update(measure(model, tokenizer, bench))
            del model
        except Exception as exc:  # noqa: BLE001 - a failing layout is reported, the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - start, 1)
        results[layout] = row
        print("RESULT", layout, json.dumps(row), flush=True)
        if out:  # after every layout: a call that runs out of time keeps what finished
            with open(os.path.join(out, "aqlm_decode.json"), "w") as fh:
                json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
