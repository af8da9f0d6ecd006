"""Batch-1 matrix-vector products on the 8B shapes: bf16 cuBLAS vs tinygemm int4 vs the project's Triton
int4 GEMV (sweep/backends/triton_int4.py, a small sweep of its tile sizes) vs FP8 (W8A16 dequantize +
matmul, W8A8 torch._scaled_mm; sweep/backends/fp8_linear.py). Each timing is one CUDA graph over
distinct weights (16 copies, 4 for the big shapes) so that L2 holds none of them. One JSON line per
result.

    python benchmarks/device/int4_gemv.py [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sweep.backends.tinygemm import TinyGemmInt4Linear  # noqa: E402
from sweep.backends.triton_int4 import gemv_int4, pack  # noqa: E402

from decode_profile import emit, graph_time  # noqa: E402  (this folder is on sys.path when run as a script)

DEVICE = "cuda"
GROUP = 128
# (in, out) of the 8B decoder's linears, fused as the tinygemm path fuses them, and its head.
SHAPES = {"q/o 4096x4096": (4096, 4096), "qkv fused 4096x6144": (4096, 6144), "gate_up fused 4096x28672": (4096, 28672),
          "down 14336x4096": (14336, 4096), "lm_head 4096x128256": (4096, 128256)}


def source(n, k):
    return (torch.randint(0, 16, (n, k), device=DEVICE, dtype=torch.uint8),
            torch.rand(n, k // GROUP, device=DEVICE) * 0.01 + 1e-3, torch.randint(0, 16, (n, k // GROUP), device=DEVICE))


def dequantized(codes, scales, zeros):
    """The float weights the packed kernels compute from source(): (q - z) * s with s rounded to bfloat16."""
    return ((codes.float() - zeros.float().repeat_interleave(GROUP, 1))
            * scales.to(torch.bfloat16).float().repeat_interleave(GROUP, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer Triton tile configurations")
    ap.add_argument("--no-fp8", action="store_true", help="leave out the FP8 modules")
    ap.add_argument("--no-tinygemm", action="store_true", help="leave out tinygemm")
    ap.add_argument("--cuda", action="store_true", help="also build and time the CUDA C++ kernel (sweep/backends/cuda_int4.py)")
    ap.add_argument("--converts", default="0,1,2",
                    help="the Triton kernel's nibble-to-float conversions to time (sweep/backends/triton_int4.py)")
    args = ap.parse_args()
    converts = [int(c) for c in args.converts.split(",") if c.strip()]   # "" = no Triton kernel
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "triton": __import__("triton").__version__})
    # (block_n, block_k, num_warps, split_k, per_group_scales, convert): the integer-to-float conversion
    # (0) only on the tiles that were best for it (third visit), the bitcast conversions on a grid.
    configs = [(8, 2048, 4, 1, True, 0), (16, 4096, 8, 1, True, 0), (16, 2048, 4, 1, True, 0)]
    configs = [c for c in configs if c[-1] in converts]
    configs += [(bn, bk, w, sk, True, 2) for bn, bk, w, sk in itertools.product([8, 16, 32], [1024, 2048, 4096], [4, 8], [1, 2])
                if 2 in converts]
    configs += [(bn, bk, w, 1, True, 1) for bn, bk, w in [(8, 1024, 4), (8, 2048, 4), (16, 2048, 4), (16, 4096, 8), (32, 2048, 8)]
                if 1 in converts]
    if args.quick:
        configs = [(8, 1024, 2, 1, True, c) for c in converts]
    for name, (k, n) in SHAPES.items():
        copies = 16 if n * k < 64 * 2**20 else 4
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        int4_bytes = n * k / 2 + n * (k // GROUP) * 4
        row = {"shape": name}
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
        t16 = graph_time(lambda: [x @ w.t() for w in weights]) / copies
        row.update(bf16_us=round(t16 * 1e6, 2), bf16_TBps=round(n * k * 2 / t16 / 1e12, 2))
        del weights
        sources = [source(n, k) for _ in range(copies)]
        codes, scales, zeros = sources[0]
        reference = dequantized(codes, scales, zeros)
        expected = x.float() @ reference.t()
        del reference
        tt = float("nan")
        if not args.no_tinygemm:
            tiny = [TinyGemmInt4Linear(c.int(), s.t().contiguous().half(), z.t().contiguous(), GROUP) for c, s, z in sources]
            tt = graph_time(lambda: [layer(x) for layer in tiny]) / copies
            row.update(tinygemm_us=round(tt * 1e6, 2), tinygemm_TBps=round(int4_bytes / tt / 1e12, 2))
            del tiny
        packed = [pack(c, s, z, torch.bfloat16) for c, s, z in sources]
        del sources
        for convert in converts:
            y = gemv_int4(x, *packed[0], GROUP, convert=convert)
            row[f"triton_rel_err_convert{convert}"] = round(
                ((y.float() - expected).abs().max() / expected.abs().max()).item(), 5)
        best = {}
        for block_n, block_k, warps, split, grouped, convert in configs:
            if k % (block_k * split):
                continue
            try:
                t = graph_time(lambda: [gemv_int4(x, *p, GROUP, block_n, block_k, warps, split, grouped, convert)
                                        for p in packed]) / copies
            except Exception as err:  # a tile the compiler refuses (registers, shared memory)
                emit({"shape": name, "config": [block_n, block_k, warps, split, grouped, convert],
                      "error": f"{type(err).__name__}: {str(err)[:200]}"})
                continue
            if convert not in best or t < best[convert][0]:
                best[convert] = (t, (block_n, block_k, warps, split, grouped, convert))
        for convert, (t, config) in best.items():
            key = f"triton{convert}"
            row.update({f"{key}_us": round(t * 1e6, 2), f"{key}_TBps": round(int4_bytes / t / 1e12, 2),
                        f"{key}_config": config, f"{key}_vs_bf16": round(t16 / t, 2)})
        row["tinygemm_vs_bf16"] = round(t16 / tt, 2)
        if args.cuda:  # the CUDA C++ kernel (sweep/backends/cuda_int4.py), same packed buffers
            try:
                from sweep.backends import cuda_int4
                y = cuda_int4.gemv_int4(x, *packed[0], GROUP)
                row["cuda_rel_err"] = round(((y.float() - expected).abs().max() / expected.abs().max()).item(), 5)
                best_cuda = None
                for rows_per_block, (per_thread, per_step) in itertools.product(
                        [8, 16, 32, 64, 128], [(1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 1), (4, 2)]):
                    threads = k // (32 * per_thread)
                    if k % (32 * per_thread) or threads % 32 or threads > 512 or rows_per_block % per_step:
                        continue
                    t = graph_time(lambda: [cuda_int4.gemv_int4(x, *p, GROUP, rows_per_block, per_thread, per_step)
                                            for p in packed]) / copies
                    if best_cuda is None or t < best_cuda[0]:
                        best_cuda = (t, (rows_per_block, per_thread, per_step))
                row.update(cuda_us=round(best_cuda[0] * 1e6, 2), cuda_TBps=round(int4_bytes / best_cuda[0] / 1e12, 2),
                           cuda_config=best_cuda[1], cuda_vs_bf16=round(t16 / best_cuda[0], 2))
            except Exception as err:
                row["cuda_error"] = f"{type(err).__name__}: {str(err)[-1500:]}"
        del packed
        # FP8 at batch 1 (the packed modules of method=fp8)
        try:
            if args.no_fp8:
                raise RuntimeError("skipped (--no-fp8)")
            from sweep.backends.fp8_linear import Fp8DynamicLinear, Fp8WeightOnlyLinear
            linears = [torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
            for cls, key in ((Fp8DynamicLinear, "fp8_w8a8"), (Fp8WeightOnlyLinear, "fp8_w8a16")):
                mods = [cls(lin, -1) for lin in linears]
                out = mods[0](x)
                ref = x.float() @ linears[0].weight.float().t()
                row[f"{key}_rel_err"] = round(((out.float() - ref).abs().max() / ref.abs().max()).item(), 4)
                tf = graph_time(lambda: [m(x) for m in mods]) / copies
                row.update({f"{key}_us": round(tf * 1e6, 2), f"{key}_vs_bf16": round(t16 / tf, 2)})
                del mods
            del linears
        except Exception as err:
            row["fp8_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        emit(row)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
