"""Nsight Compute view of the CUDA int4 GEMV (sweep/backends/cuda_int4.py) on the 8B gate/up shape:
    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        -k regex:gemv_int4 -c 2 python benchmarks/device/gemv_ncu.py ROWS_PER_BLOCK PER_THREAD ROWS_PER_STEP
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sweep.backends import cuda_int4  # noqa: E402
from sweep.backends.triton_int4 import pack  # noqa: E402

n, k, group = 28672, 4096, 128
codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
scales = torch.rand(n, k // group, device="cuda") * 0.01
zeros = torch.randint(0, 16, (n, k // group), device="cuda")
packed = pack(codes, scales, zeros, torch.bfloat16)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
rpb, per_thread, per_step = (int(a) for a in sys.argv[1:4])
for _ in range(3):
    cuda_int4.gemv_int4(x, *packed, group, rpb, per_thread, per_step)
torch.cuda.synchronize()
