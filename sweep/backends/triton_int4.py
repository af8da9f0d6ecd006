"""The project's own int4 matrix-vector kernel for batch-1 decode on CUDA GPUs (Triton).

Decode at batch 1 is a stream of matrix-vector products: its speed is the bytes of weights read per
second. The library int4 kernels measured on the H200 (tinygemm, Marlin) reach 0.9-2.3 TB/s on the 8B
shapes where bf16 cuBLAS reaches 2.7-4.1 (docs/benchmarks.md), so int4 decode gains far less than its
3.5x fewer bytes. This kernel is written for that one case: each program owns a few output rows and
streams their packed codes over the whole input, with wide loads, no shared-memory staging and no
tensor cores (a vector has nothing to reuse).

Format (GPTQ's dequantization, w = (q - z) * s, groups of `group_size` input columns):
- qweight: int32 [out, in / 8], eight 4-bit codes per word, input column 8j + i in bits 4i..4i+3;
- scales:  float16/bfloat16 [out, in / group_size];
- zs:      the same shape, z * s precomputed, so that a group's contribution is s·Σ q·x − zs·Σ x.
"""
from __future__ import annotations

from typing import Tuple

import torch

try:  # Triton ships with CUDA builds of torch; a CPU machine has no use for this module
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None
    tl = None


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """codes uint8 [out, in] in 0..15, scales/zeros [out, in / group] → (qweight, scales, zs) of this kernel."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"in_features={k} must be a multiple of 8 to pack eight int4 codes per int32")
    c = codes.to(torch.int64).reshape(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (c << shifts).sum(dim=-1)                      # 0 .. 2^32 - 1
    qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    s = scales.to(dtype).contiguous()
    zs = (zeros.float() * scales.float()).to(dtype).contiguous()
    return qweight, s, zs


if triton is not None:
    @triton.jit
    def _gemv_int4_kernel(x_ptr, q_ptr, s_ptr, zs_ptr, y_ptr, N, K, K_PER_SPLIT,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          PER_GROUP_SCALES: tl.constexpr, CONVERT: tl.constexpr):
        # Work on the words as loaded ([BLOCK_N, BLOCK_K / 8], contiguous along the input): nibble i of
        # word w is input column 8w + i, so the 8 nibble planes each meet a strided slice of x. No
        # reshape, so no layout conversion through shared memory.
        #
        # CONVERT picks how a nibble becomes a float. 0: shift, mask, integer-to-float conversion,
        # whose throughput (a quarter of the FMA rate or less) caps the kernel near 2 TB/s on Hopper.
        # 1 and 2: place the nibble in the mantissa of 128.0 (bits 0x43000000) and reinterpret the
        # word as a float, which is exact: 0x43000000 | q << 16 is 128 + q, 0x43000000 | q << 12 is
        # 128 + q / 16. The 128 is taken back once per word from Σ x (the same Σ x the zero point
        # needs), so each weight costs a shift or two, a mask-and-or (one LOP3) and an FMA.
        # 2 shares one shift between two nibbles (the even one lands at bits 12-15, the odd at 16-19).
        # Measured on the H200 (docs/benchmarks.md): 2 is 3-7% faster than 0, so the conversion was not
        # what held this kernel near 2 TB/s.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        words = tl.arange(0, BLOCK_K // 8)
        n_groups = K // GROUP
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            packed = tl.load(q_ptr + rows[:, None] * (K // 8) + (k0 // 8 + words)[None, :],
                             mask=row_ok[:, None], other=0, eviction_policy="evict_first")
            col = k0 + 8 * words                                          # first column of each word
            inner = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            if CONVERT == 0:
                for i in tl.static_range(8):
                    xi = tl.load(x_ptr + col + i).to(tl.float32)
                    qi = ((packed >> (4 * i)) & 0xF).to(tl.float32)
                    inner += qi * xi[None, :]
                    xsum += xi
            elif CONVERT == 1:
                for i in tl.static_range(8):
                    xi = tl.load(x_ptr + col + i).to(tl.float32)
                    if i <= 4:
                        shifted = packed << (16 - 4 * i)
                    else:
                        shifted = packed >> (4 * i - 16)
                    qi = ((shifted & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)   # 128 + q
                    inner += qi * xi[None, :]
                    xsum += xi
                inner -= 128.0 * xsum[None, :]
            else:
                inner_even = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
                xsum_even = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
                xsum_odd = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
                for p in tl.static_range(4):
                    x_even = tl.load(x_ptr + col + 2 * p).to(tl.float32)
                    x_odd = tl.load(x_ptr + col + 2 * p + 1).to(tl.float32)
                    if p <= 1:
                        shifted = packed << (12 - 8 * p)
                    else:
                        shifted = packed >> (8 * p - 12)
                    q_even = ((shifted & 0x0000F000) | 0x43000000).to(tl.float32, bitcast=True)  # 128 + q / 16
                    q_odd = ((shifted & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)   # 128 + q
                    inner_even += q_even * x_even[None, :]
                    inner += q_odd * x_odd[None, :]
                    xsum_even += x_even
                    xsum_odd += x_odd
                inner += 16.0 * inner_even - (2048.0 * xsum_even + 128.0 * xsum_odd)[None, :]
                xsum = xsum_even + xsum_odd
            if PER_GROUP_SCALES:
                # Σ over each group's words first, then one scale per group and row: 1/16th of the
                # scale loads of the per-word form below.
                WPG: tl.constexpr = GROUP // 8
                inner_g = tl.sum(tl.reshape(inner, (BLOCK_N, BLOCK_K // GROUP, WPG)), axis=2)
                xsum_g = tl.sum(tl.reshape(xsum, (BLOCK_K // GROUP, WPG)), axis=1)
                g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                s = tl.load(s_ptr + rows[:, None] * n_groups + g[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
                zs = tl.load(zs_ptr + rows[:, None] * n_groups + g[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
                acc_g += s * inner_g - zs * xsum_g[None, :]
            else:
                g = col // GROUP
                s = tl.load(s_ptr + rows[:, None] * n_groups + g[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
                zs = tl.load(zs_ptr + rows[:, None] * n_groups + g[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
                acc += s * inner - zs * xsum[None, :]
        out = tl.sum(acc, axis=1) + tl.sum(acc_g, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            tl.atomic_add(y_ptr + rows, out, mask=row_ok)


def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
              block_n: int = 8, block_k: int = 1024, num_warps: int = 2, split_k: int = 1,
              per_group_scales: bool = True, convert: int = 2) -> torch.Tensor:
    """y = x @ dequantized(W)ᵀ for one row x [1, in] (or [in]); returns [1, out] in x's dtype.

    split_k > 1 splits the input dimension over that many programs per row block (more programs in
    flight for shapes with few rows), adding into a float32 output."""
    if triton is None:
        raise RuntimeError("the Triton int4 kernel needs triton (CUDA builds of torch ship it)")
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if k % (block_k * split_k) or block_k % 8:
        raise ValueError(f"in_features={k} must be a multiple of block_k * split_k = {block_k * split_k}")
    x = x.reshape(-1)
    y = torch.empty(n, device=x.device, dtype=x.dtype) if split_k == 1 else \
        torch.zeros(n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_int4_kernel[grid](x, qweight, scales, zs, y, n, k, k // split_k, GROUP=group_size, BLOCK_N=block_n,
                            BLOCK_K=block_k, SPLIT_K=split_k, PER_GROUP_SCALES=per_group_scales,
                            CONVERT=convert, num_warps=num_warps)
    return y.to(x.dtype).reshape(1, n)
