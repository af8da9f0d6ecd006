"""Small-batch int4 matmuls on the 8B shapes: where does 4-bit stop paying, per kernel?

For each shape and batch (rows of x): bf16 cuBLAS, tinygemm (one call for all rows), the project's GEMV
(one call per row, as GemvInt4Linear ran batches before the tensor-core kernel) and the tensor-core kernel
(sweep/backends/cuda_int4.py mma_int4, a sweep of its tiles, the best kept). Each timing is one CUDA
graph over distinct weights (L2 holds none of them). First checks the tensor-core kernel against the
exact dequantized matmul at every batch. One JSON line per shape and batch.

    python benchmarks/device/int4_batch.py [--batches 1,2,4,8,16,32,64] [--shapes q/o,down]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sweep.backends import cuda_int4  # noqa: E402
from sweep.backends.tinygemm import TinyGemmInt4Linear  # noqa: E402
from sweep.backends.triton_int4 import pack  # noqa: E402

from decode_profile import emit, graph_time  # noqa: E402  (this folder is on sys.path when run as a script)
from int4_gemv import GROUP, SHAPES, dequantized, source  # noqa: E402

DEVICE = "cuda"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--shapes", default="", help="comma-separated prefixes of the shape names (default: all)")
    ap.add_argument("--no-tinygemm", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    wanted = [w for w in args.shapes.split(",") if w]
    emit({"benchmark": "int4_batch", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    for name, (k, n) in SHAPES.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        copies = 16 if n * k < 64 * 2**20 else 4
        sources = [source(n, k) for _ in range(copies)]
        packed = [pack(c, s, z, torch.bfloat16) for c, s, z in sources]
        reference = dequantized(*sources[0])
        tiny = None if args.no_tinygemm else [
            TinyGemmInt4Linear(c.int(), s.t().contiguous().half(), z.t().contiguous(), GROUP) for c, s, z in sources]
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
        int4_bytes = n * k / 2 + n * (k // GROUP) * 4
        gemv_tile = cuda_int4.tile_for(k, n)
        for batch in batches:
            x = torch.randn(batch, k, device=DEVICE, dtype=torch.bfloat16)
            row = {"shape": name, "batch": batch}
            t16 = graph_time(lambda: [x @ w.t() for w in weights]) / copies
            row.update(bf16_us=round(t16 * 1e6, 2))
            if tiny is not None:
                tt = graph_time(lambda: [layer(x) for layer in tiny]) / copies
                row.update(tinygemm_us=round(tt * 1e6, 2), tinygemm_vs_bf16=round(t16 / tt, 2))
            if batch <= 8:
                tg = graph_time(lambda: [[cuda_int4.gemv_int4(x[i:i + 1], *p, GROUP, *gemv_tile) for i in range(batch)]
                                         for p in packed]) / copies
                row.update(gemv_rows_us=round(tg * 1e6, 2), gemv_rows_vs_bf16=round(t16 / tg, 2))
            try:
                expected = x.float() @ reference.t()
                chunks = [(i, min(cuda_int4.MMA_ROWS, batch - i)) for i in range(0, batch, cuda_int4.MMA_ROWS)]
                y = torch.cat([cuda_int4.mma_int4(x[i:i + r], *packed[0], GROUP, *cuda_int4.mma_tile_for(n, r))
                               for i, r in chunks])
                n_tiles = cuda_int4.mma_tile_for(n, chunks[0][1])[1]
                row["mma_rel_err"] = round(((y.float() - expected).abs().max() / expected.abs().max()).item(), 5)
                best, timed = None, {}
                m_options = {1: (1, 2, 4), 2: (1, 2), 4: (1, 2)}[n_tiles]
                for m_tiles, warps in itertools.product(m_options, (2, 4, 8)):
                    def run():
                        return [[cuda_int4.mma_int4(x[i:i + r], *p, GROUP, m_tiles, n_tiles, warps) for i, r in chunks]
                                for p in packed]
                    t = graph_time(run) / copies
                    timed[(m_tiles, n_tiles, warps)] = t
                    if best is None or t < best[0]:
                        best = (t, (m_tiles, n_tiles, warps))
                # the tile GemvInt4Linear picks (mma_tile_for), timed in the same sweep: what adopting the best would gain
                default = cuda_int4.mma_tile_for(n, chunks[0][1])
                if default in timed:
                    row["mma_default_us"] = round(timed[default] * 1e6, 2)
                row.update(mma_us=round(best[0] * 1e6, 2), mma_config=best[1], mma_default=default,
                           mma_TBps=round(int4_bytes * len(chunks) / best[0] / 1e12, 2),
                           mma_vs_bf16=round(t16 / best[0], 2))
            except Exception as err:  # noqa: BLE001 - a kernel that fails is the result to record
                row["mma_error"] = f"{type(err).__name__}: {str(err)[-1500:]}"
            emit(row)
        del sources, packed, tiny, weights, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
