"""Where a batch-1 decode step's time goes on the Llama-3.1-8B shape (random weights, one CUDA GPU).

Variants of one model: fp16; every decoder linear on tinygemm int4 (random codes, group 128,
sweep/backends/tinygemm.py), unfused and with q/k/v and gate/up fused
(sweep/backends/tinygemm_fusion.py); the same in bfloat16 (tinygemm's activation dtype, so
no casts). For each variant:
- `generate`: transformers' generate() with a static cache (its compiled decode step, CUDA graphs),
  timed per token after a synchronize, as sweep's bench.mode=static does;
- `graph`: the decode loop a serving engine runs: the compiled step (reduce-overhead, CUDA graphs)
  replayed with the next token chosen on the device and no host synchronisation between steps;
- `kernels`: CUDA kernel time per step from the profiler over the graph loop, top kernels.
Also a microbenchmark of the fused matmul shapes, each over enough distinct weights that they
cannot stay in L2 between replays.
Prints JSON lines; writes $OUT/decode_profile.jsonl.
It needs only torch and transformers (the bare GPU machine, no carried wheels), which is why it
times generate() and the graph loop itself rather than through sweep.measure.latency (which needs
the config stack: hydra, omegaconf).
usage: python benchmarks/device/decode_profile.py [--microbench] [--variants fp16,int4,int4_fused,...] [--layers 32]
       (--microbench --variants "": the per-shape table alone, with each shape's max error against
       GPTQ's dequantization of the same codes)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from sweep.backends.tinygemm import TinyGemmInt4Linear
from sweep.backends.tinygemm_fusion import fuse_projections

GROUP = 128
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=False)
VARIANTS = ("fp16", "int4", "int4_fused_mlp", "int4_fused", "bf16", "int4_bf16_fused", "int4_bf16_fused_head",
            "gemv_bf16_fused", "gemv_bf16_fused_head")
GEMLITE = False
DEVICE = "cuda"  # --device cpu: a quick functional check of this script, timings meaningless


def emit(row):
    print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):  # line by line, so a run cut short keeps what it measured
        with open(os.path.join(os.environ["OUT"], "decode_profile.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(layers: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def replace_decoder_linears(model, build):
    """Every decoder linear replaced by build(*random_source(out, in)) (a kernel's speed does not depend on the codes)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, build(*random_source(*linear.weight.shape)))
                    del linear
    torch.cuda.empty_cache()


def tinygemm_layer(codes, scales, zeros):
    """A tinygemm int4 layer from codes [out, in] and group scales/zeros [out, in/g] (GPTQ's w = (q - z) * s)."""
    return TinyGemmInt4Linear(codes.int(), scales.t().contiguous().half(), zeros.t().contiguous(), GROUP)


def gemv_layer(codes, scales, zeros):
    """The project's CUDA int4 GEMV layer (sweep/backends/cuda_int4.py), bfloat16 activations and scales."""
    from sweep.backends.cuda_int4 import GemvInt4Linear

    return GemvInt4Linear(codes, scales, zeros, GROUP, dtype=torch.bfloat16)


def replace_head(model, build):
    """The LM head on the same kernel (random codes; the head is ~1 GB of a bf16 8B model's 16 GB)."""
    head = model.lm_head
    model.lm_head = build(*random_source(*head.weight.shape))
    del head
    torch.cuda.empty_cache()


def gemlite_layer(codes, scales, zeros):
    """A GemLite A16W4 layer (Triton GEMV at batch 1) from codes [out, in] and group scales/zeros [out, in/g]."""
    from gemlite import DType, GemLiteLinearTriton

    n, k = codes.shape
    layer = GemLiteLinearTriton(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.FP16,
                                output_dtype=DType.FP16)
    layer.pack(codes.to(torch.uint8), scales.half(), zeros.half(), bias=None)
    layer.source = (codes.to(torch.uint8), scales.half(), zeros.half())  # for fusing in this script
    return layer


def random_source(n, k):
    return (torch.randint(0, 16, (n, k), device=DEVICE, dtype=torch.uint8),
            torch.rand(n, k // GROUP, device=DEVICE) * 0.01 + 1e-3, torch.randint(0, 16, (n, k // GROUP), device=DEVICE))


def fuse_gemlite(model):
    from gemlite import GemLiteLinearTriton

    def concatenate(layers):
        return gemlite_layer(*(torch.cat(parts, 0) for parts in zip(*(layer.source for layer in layers))))

    counts = fuse_projections(model, fusable=lambda m: isinstance(m, GemLiteLinearTriton), concatenate=concatenate)
    for module in model.modules():
        module.__dict__.pop("source", None)
    torch.cuda.empty_cache()
    return counts


def weight_mb(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def prompt(length=32):
    return torch.randint(100, 20000, (1, length), device=DEVICE)


@torch.no_grad()
def generate_static(model, new_tokens):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.seen = [], False

        def put(self, value):
            if self.seen:
                sync()
                self.times.append(time.perf_counter())
            self.seen = True

        def end(self):
            pass

    ids = prompt()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
               pad_token_id=0)
    t0 = time.perf_counter()
    for _ in range(2):
        model.generate(input_ids=ids, **gen)
    warm_s = time.perf_counter() - t0
    clock = Clock()
    model.generate(input_ids=ids, **gen, streamer=clock)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    steps.sort()
    return {"itl_ms_p50": round(steps[len(steps) // 2] * 1e3, 3),
            "tokens_per_s": round(len(steps) / sum(steps), 1), "warmup_s": round(warm_s, 1)}


@torch.no_grad()
def graph_loop(model, new_tokens, profile=False):
    from transformers import StaticCache

    ids = prompt()
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 16)
    logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1], device=DEVICE),
                   use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([ids.shape[1]], device=DEVICE)

    def step(token, position):
        out = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    t0 = time.perf_counter()
    for _ in range(4):  # compile, record the CUDA graph, replay
        token = compiled(token, position).clone()
        position += 1
    sync()
    warm_s = time.perf_counter() - t0
    n = new_tokens - 8
    start = time.perf_counter()
    for _ in range(n):
        token = compiled(token, position).clone()
        position += 1
    sync()
    seconds = time.perf_counter() - start
    row = {"step_ms": round(seconds / n * 1e3, 3), "tokens_per_s": round(n / seconds, 1), "warmup_s": round(warm_s, 1)}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        position -= 4
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                token = compiled(token, position).clone()
                position += 1
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in kernels) / 4
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
        row["kernel_us_per_step"] = round(total, 1)
        row["top_kernels"] = [(e.key[:60], round(e.self_device_time_total / 4, 1), e.count // 4) for e in top]
    return row


def microbench():
    """tinygemm per shape, incl. the fused ones, over 16 distinct weights so L2 cannot hold them."""
    shapes = {"q/o 4096x4096": (4096, 4096), "k/v 4096x1024": (4096, 1024), "qkv fused 4096x6144": (4096, 6144),
              "gate/up 4096x14336": (4096, 14336), "gate_up fused 4096x28672": (4096, 28672),
              "down 14336x4096": (14336, 4096)}
    for name, (k, n) in shapes.items():
        copies = 16 if n * k < 64 * 2**20 else 4
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
        sources = [random_source(n, k) for _ in range(copies)]
        layers = [tinygemm_layer(*source) for source in sources]
        codes, scales, zeros = sources[0]
        reference = (codes.float() - zeros.float().repeat_interleave(GROUP, 1)) * \
            scales.half().float().repeat_interleave(GROUP, 1)  # GPTQ's dequantization, [out, in]
        expected = x.float() @ reference.t()
        rel_err = ((layers[0](x).float() - expected).abs().max() / expected.abs().max()).item()
        del sources, codes, scales, zeros, reference
        t16 = graph_time(lambda: [x @ w.t() for w in weights]) / copies
        t4 = graph_time(lambda: [layer(x) for layer in layers]) / copies
        row = {"microbench": name, "int4_rel_err": round(rel_err, 5), "bf16_us": round(t16 * 1e6, 2),
               "int4_us": round(t4 * 1e6, 2),
               "speedup": round(t16 / t4, 2), "int4_TBps": round((n * k / 2 + n * k // GROUP * 4) / t4 / 1e12, 2),
               "bf16_TBps": round(n * k * 2 / t16 / 1e12, 2)}
        del layers
        if GEMLITE:
            try:
                x16 = x.half()
                glayers = [gemlite_layer(*random_source(n, k)) for _ in range(copies)]
                tg = graph_time(lambda: [layer(x16) for layer in glayers]) / copies
                row.update(gemlite_us=round(tg * 1e6, 2), gemlite_speedup=round(t16 / tg, 2),
                           gemlite_TBps=round((n * k / 2 + n * k // GROUP * 4) / tg / 1e12, 2))
                del glayers
            except Exception as err:
                row["gemlite_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        emit(row)
        del weights
        torch.cuda.empty_cache()
    # fused vs separate outputs on CUDA (the packed layout joins along rows)
    k = 4096
    parts = [tinygemm_layer(*random_source(n, k)) for n in (4096, 1024, 1024)]
    fused = TinyGemmInt4Linear.concatenate(parts)
    x = torch.randn(3, k, device=DEVICE, dtype=torch.float16)
    diff = (fused(x) - torch.cat([p(x) for p in parts], -1)).abs().max().item()
    emit({"fused_matches_separate_on_cuda": diff})


def graph_time(fn, iters=100):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def run_variant(variant, layers, new_tokens, modes):
    dtype = torch.bfloat16 if "bf16" in variant else torch.float16
    torch._dynamo.reset()
    model = build(layers, dtype)
    row = {"variant": variant, "layers": layers, "dtype": str(dtype)}
    if variant.startswith("gemlite"):
        replace_decoder_linears(model, gemlite_layer)
        if "fused" in variant:
            row["fused"] = fuse_gemlite(model)
        else:
            for module in model.modules():
                module.__dict__.pop("source", None)
    if variant.startswith("int4"):
        replace_decoder_linears(model, tinygemm_layer)
        if "fused" in variant:
            row["fused"] = fuse_projections(model, qkv="fused_mlp" not in variant)
        if variant.endswith("_head"):
            replace_head(model, tinygemm_layer)
    if variant.startswith("gemv"):  # e.g. gemv_bf16_fused_head
        from sweep.backends.cuda_int4 import GemvInt4Linear

        replace_decoder_linears(model, gemv_layer)
        if "fused" in variant:
            # A one-token probe: the GEMV path itself (per-row sums, so fusing changes nothing); a
            # longer probe would compare cuBLAS matmuls of different widths, which round differently.
            row["fused"] = fuse_projections(model, fusable=lambda m: isinstance(m, GemvInt4Linear),
                                            concatenate=GemvInt4Linear.concatenate,
                                            probe_ids=torch.ones(1, 1, dtype=torch.long, device=DEVICE))
        if variant.endswith("_head"):
            replace_head(model, gemv_layer)
    row["weights_mb"] = round(weight_mb(model))
    try:
        if "generate" in modes:
            row["generate"] = generate_static(model, new_tokens)
        if "graph" in modes:
            row["graph"] = graph_loop(model, new_tokens, profile="profile" in modes)
    except Exception as err:  # keep the other variants
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
    emit(row)
    del model
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="fp16,int4,int4_fused")
    parser.add_argument("--modes", default="generate,graph,profile")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--microbench", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE, GEMLITE
    DEVICE = args.device
    try:
        import gemlite  # noqa: F401
        GEMLITE = DEVICE == "cuda"
    except ImportError:
        pass
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    emit({"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    if args.microbench:
        microbench()
    for variant in filter(None, args.variants.split(",")):
        t0 = time.perf_counter()
        run_variant(variant, args.layers, args.new_tokens, args.modes.split(","))
        print(f"# {variant} took {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
