"""Check and time the tinygemm int4 kernel (sweep/backends/tinygemm.py) against fp16 on one GPU.

For each linear shape of Llama-3.1-8B: random GPTQ-style codes are moved onto the kernel, compared
with the reference dequantization (max error), and one batch-1 decode matmul is timed inside a
CUDA graph (so launch overhead does not hide the memory-bound kernel time), fp16 vs int4.
Prints one JSON line per shape and a summary line; writes them to $OUT/int4_check.jsonl if set.
usage: python benchmarks/device/int4_check.py
"""
import json
import os

import torch

from sweep.backends.tinygemm import TinyGemmInt4Linear

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}
GROUP = 128


def graph_time(fn, iters=200) -> float:
    """Seconds per call of fn() replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters / 10


def main():
    torch.manual_seed(0)
    lines, total = [], {"fp16": 0.0, "int4": 0.0}
    for name, (k, n) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), device="cuda")
        scales = torch.rand(k // GROUP, n, device="cuda") * 0.01 + 1e-3
        zeros = torch.randint(0, 16, (k // GROUP, n), device="cuda")
        layer = TinyGemmInt4Linear(codes, scales.half(), zeros, GROUP)
        groups = torch.arange(k, device="cuda") // GROUP
        weight = (scales.half().float()[groups] * (codes.t().float() - zeros.float()[groups])).t().half()
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ weight.float().t()
        err = ((layer(x).float() - ref).abs().max() / ref.abs().max()).item()
        t16 = graph_time(lambda: x @ weight.t())
        t4 = graph_time(lambda: layer(x))
        compiled = torch.compile(layer, fullgraph=True)
        ok_compile = torch.allclose(compiled(x).float(), layer(x).float(), atol=1e-2, rtol=1e-2)
        fp16_bytes, int4_bytes = n * k * 2, n * k // 2 + (k // GROUP) * n * 4
        row = {"shape": name, "k": k, "n": n, "rel_err": round(err, 5), "fp16_us": round(t16 * 1e6, 2),
               "int4_us": round(t4 * 1e6, 2), "speedup": round(t16 / t4, 2),
               "fp16_TBps": round(fp16_bytes / t16 / 1e12, 2), "int4_TBps": round(int4_bytes / t4 / 1e12, 2),
               "compiles": bool(ok_compile)}
        per_layer = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}[name]
        total["fp16"] += per_layer * t16
        total["int4"] += per_layer * t4
        lines.append(row)
        print(json.dumps(row), flush=True)
    summary = {"decoder_layer_linears_fp16_us": round(total["fp16"] * 1e6, 1),
               "decoder_layer_linears_int4_us": round(total["int4"] * 1e6, 1),
               "speedup": round(total["fp16"] / total["int4"], 2), "gpu": torch.cuda.get_device_name(0),
               "torch": torch.__version__}
    print("SUMMARY", json.dumps(summary), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "int4_check.jsonl"), "w") as f:
            for row in lines + [summary]:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
