"""hqq 4-bit layers repacked onto tinygemm (sweep.backends.hqq_backend.to_tinygemm_int4), on CUDA.

A minute's check for the GPU machine (no model, no store): for each linear shape of the 8B model,
quantize a random bfloat16 weight with hqq (4-bit, g64, axis 1), repack it for
aten._weight_int4pack_mm with the first-layer check on, compare its output with hqq's own
dequantize-then-matmul, and time both at batch 1 (CUDA graph over distinct copies, so the weights
are read from HBM, not L2). Then try torch.compile(fullgraph) on one optimum-quanto int4 layer,
the trace that failed in the 8B decode on the tenth visit, and print what dynamo says.

Usage (inside a device `run`, after `. benchmarks/device/setup.sh`): python3 benchmarks/device/hqq_tinygemm.py
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from sweep.backends.hqq_backend import quant_config, quantize_linear, to_tinygemm_int4

SHAPES = {"q/o": (4096, 4096), "qkv fused": (6144, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
COPIES = 8


def timed_us(fn, x, copies) -> float:
    """Microseconds per call, one CUDA graph replaying every copy once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in copies:
            fn(layer, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in copies:
            fn(layer, x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (20 * len(copies))


def main() -> None:
    torch.manual_seed(0)
    results = {}
    for name, (out_f, in_f) in SHAPES.items():
        row = {}
        try:
            hqq_layers, fast_layers = [], []
            for i in range(COPIES):
                linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device="cuda")
                torch.nn.init.normal_(linear.weight, std=0.02)
                layer = quantize_linear(linear, quant_config(4, 64, 1, True), "cuda")
                hqq_layers.append(layer)
                fast_layers.append(to_tinygemm_int4(layer, check=i == 0))
            x = torch.randn(1, in_f, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                expected, got = hqq_layers[0](x).float(), fast_layers[0](x).float()
                row["max_rel_error"] = float((got - expected).abs().max() / expected.abs().max())
                row["hqq_pytorch_us"] = timed_us(lambda m, v: m(v), x, hqq_layers)
                row["tinygemm_us"] = timed_us(lambda m, v: m(v), x, fast_layers)
            packed_bytes = fast_layers[0].packed_weight.numel() * fast_layers[0].packed_weight.element_size()
            row["tinygemm_tb_s"] = packed_bytes / (row["tinygemm_us"] * 1e-6) / 1e12
        except Exception as exc:  # noqa: BLE001 - a failing shape is reported, the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        results[name] = row
        print("RESULT", name, json.dumps(row), flush=True)
    try:
        from optimum.quanto import freeze, qint4, quantize

        model = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to("cuda", torch.bfloat16)
        quantize(model, weights=qint4)
        freeze(model)
        x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        results["quanto_int4_compile"] = {"ok": True, "eager_dtype": str(eager.dtype), "compiled_dtype": str(compiled.dtype),
                                          "weight_type": type(model[0].weight).__name__}
    except Exception as exc:  # noqa: BLE001 - what dynamo says is the result
        results["quanto_int4_compile"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    print("RESULT quanto_int4_compile", json.dumps(results["quanto_int4_compile"]), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "hqq_tinygemm.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    sys.exit(0)


if __name__ == "__main__":
    main()
