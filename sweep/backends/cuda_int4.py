"""The project's int4 matrix-vector kernels in CUDA C++, built with the machine's nvcc on first use.

Same format and arithmetic as the Triton kernel (sweep/backends/triton_int4.py: qweight int32
[out, in / 8], scales and zs = zero * scale [out, in / group]; w = (q - z) * s), written for the one
case where batch-1 decode spends its time: streaming the packed codes at the memory's speed.

- One thread owns U groups of 32 consecutive input columns (U 16-byte loads of codes per row) and
  keeps their activations in registers as floats for the whole kernel: a row costs the thread U
  vector loads and no activation loads.
- A nibble becomes a float without an integer-to-float conversion: OR-ing it into the mantissa of
  128.0 gives 128 + q (bits 16-19) or 128 + q/16 (bits 12-15) exactly; one shift serves two nibbles
  and the 128s come back out through Σx, which each thread precomputes once. (Measured on the H200:
  this made the Triton kernel only 3-7% faster, so conversion was not its limit.)
- A block owns `rows_per_block` output rows and reads R of them per step (R·U vector loads in flight
  per thread); partial sums are reduced by warp shuffles and once per block through shared memory.
- On the H200 it reaches 1.2-2.5 TB/s on the 8B shapes (bf16 cuBLAS: 2.7-4.25), 5-20% faster than
  tinygemm except on 4096 x 4096; Nsight Compute calls it latency-bound (registers limit the resident
  warps). docs/benchmarks.md has the figures and what was tried.

A second kernel in the same extension, `mma_int4`, serves 2-64 input rows (small-batch decode) on the
tensor cores with the same packed buffers, reading each weight once per 32 rows (its comment in the
source below says how; on the H200, 8B shape, it took batch-16 decode from 870 to 2,917 tokens/s).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from sweep.backends.triton_int4 import pack

KERNEL = "gemv_int4"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T, int U, int R>
__global__ void __launch_bounds__(512) gemv_int4_kernel(
    const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
    const T* __restrict__ zs, T* __restrict__ y, int N, int K, int rows_per_block, int group) {
  extern __shared__ float partials[];                       // [warps][rows_per_block]
  const int threads = blockDim.x, t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = threads >> 5;
  const int vec_per_row = K >> 5, n_groups = K / group;
  float xv[U][32];
  float corr[U], xsum[U];
  int gidx[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int col = (t + u * threads) * 32;
    const uint4* xp = reinterpret_cast<const uint4*>(x + col);
    float even = 0.f, odd = 0.f;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      uint4 raw = xp[v];
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[u][v * 8 + i] = to_float(h[i]);
    }
#pragma unroll
    for (int i = 0; i < 32; i += 2) { even += xv[u][i]; odd += xv[u][i + 1]; }
    corr[u] = 2048.f * even + 128.f * odd;
    xsum[u] = even + odd;
    gidx[u] = col / group;
  }
  const int row0 = blockIdx.x * rows_per_block;
  // Measured on the H200: a second register buffer that requests the next rows before computing
  // the current ones (software pipelining) spilled and was 5-15% slower, so one buffer of R rows.
  uint4 a[R][U];
#define SWEEP_LOAD(buf_, r0_)                                                                          \
  _Pragma("unroll") for (int r = 0; r < R; ++r) {                                                   \
    const int row = min(row0 + (r0_) + r, N - 1);                                                  \
    _Pragma("unroll") for (int u = 0; u < U; ++u) buf_[r][u] = __ldcs(qw + (size_t)row * vec_per_row + t + u * threads); \
  }
#define SWEEP_COMPUTE(buf_, r0_)                                                                       \
  _Pragma("unroll") for (int r = 0; r < R; ++r) {                                                   \
    const int row = min(row0 + (r0_) + r, N - 1);                                                  \
    float part = 0.f;                                                                              \
    _Pragma("unroll") for (int u = 0; u < U; ++u) {                                                 \
      const unsigned words[4] = {buf_[r][u].x, buf_[r][u].y, buf_[r][u].z, buf_[r][u].w};                     \
      float acc_even = 0.f, acc_odd = 0.f;                                                         \
      _Pragma("unroll") for (int j = 0; j < 4; ++j) {                                               \
        _Pragma("unroll") for (int p = 0; p < 4; ++p) {                                             \
          const unsigned shifted = p < 2 ? words[j] << (12 - 8 * p) : words[j] >> (8 * p - 12);    \
          acc_even = fmaf(__uint_as_float((shifted & 0x0000F000u) | 0x43000000u), xv[u][8 * j + 2 * p], acc_even); \
          acc_odd = fmaf(__uint_as_float((shifted & 0x000F0000u) | 0x43000000u), xv[u][8 * j + 2 * p + 1], acc_odd); \
        }                                                                                          \
      }                                                                                            \
      const size_t g = (size_t)row * n_groups + gidx[u];                                           \
      part += to_float(scales[g]) * (16.f * acc_even + acc_odd - corr[u]) - to_float(zs[g]) * xsum[u]; \
    }                                                                                              \
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off); \
    if (lane == 0) partials[warp * rows_per_block + (r0_) + r] = part;                             \
  }
  for (int r0 = 0; r0 < rows_per_block; r0 += R) {
    SWEEP_LOAD(a, r0)
    SWEEP_COMPUTE(a, r0)
  }
#undef SWEEP_LOAD
#undef SWEEP_COMPUTE
  __syncthreads();
  for (int r = t; r < rows_per_block; r += threads) {
    if (row0 + r >= N) break;
    float sum = 0.f;
    for (int wi = 0; wi < warps; ++wi) sum += partials[wi * rows_per_block + r];
    y[row0 + r] = from_float<T>(sum);
  }
}

template <typename T, int U, int R>
void launch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
            const torch::Tensor& zs, torch::Tensor& y, int rows_per_block, int group) {
  const int N = qweight.size(0), K = qweight.size(1) * 8;
  const int threads = K / (32 * U);
  const int blocks = (N + rows_per_block - 1) / rows_per_block;
  const size_t shared = sizeof(float) * (threads / 32) * rows_per_block;
  gemv_int4_kernel<T, U, R><<<blocks, threads, shared, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), reinterpret_cast<const T*>(zs.data_ptr()),
      reinterpret_cast<T*>(y.data_ptr()), N, K, rows_per_block, group);
}

template <typename T>
void dispatch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
              const torch::Tensor& zs, torch::Tensor& y, int64_t rows_per_block, int64_t group,
              int64_t per_thread, int64_t rows_per_step) {
#define SWEEP_CASE(U_, R_) \
  if (per_thread == U_ && rows_per_step == R_) return launch<T, U_, R_>(x, qweight, scales, zs, y, rows_per_block, group);
  SWEEP_CASE(1, 2) SWEEP_CASE(1, 4) SWEEP_CASE(1, 8) SWEEP_CASE(2, 2) SWEEP_CASE(2, 4) SWEEP_CASE(4, 1) SWEEP_CASE(4, 2)
#undef SWEEP_CASE
  TORCH_CHECK(false, "gemv_int4: no kernel for per_thread=", per_thread, " rows_per_step=", rows_per_step);
}


// ---- Small batches (2..8*NT rows) on the tensor cores: each packed weight is read once for all rows ----
// mma.sync m16n8k16: A = 16 weight rows x 16 inputs (the codes, as 128 + q in bf16 / 1024 + q in fp16,
// exact), B = 16 inputs x 8 batch rows of x, fp32 accumulators. The 16 inputs of one mma need not be
// consecutive columns, only the same ones in A and B: thread (g = lane / 4, t = lane % 4) loads 32
// consecutive columns (one 16-byte vector per weight row) of a 128-column chunk and feeds the 8 mmas of
// the chunk 4 of them each, so neither the weights nor x are repacked. A chunk lies inside one
// quantization group (group % 128 == 0), so its sums are scaled once: y += s * (acc - OFF * sum(x)) - zs * sum(x).
template <typename T> struct MmaOf;
template <> struct MmaOf<__nv_bfloat16> {
  static constexpr unsigned kPair = 0x43004300u; static constexpr float kOffset = 128.f;
  static __device__ __forceinline__ float pair_sum(unsigned u) { return __uint_as_float(u << 16) + __uint_as_float(u & 0xffff0000u); }
  static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaOf<__half> {
  static constexpr unsigned kPair = 0x64006400u; static constexpr float kOffset = 1024.f;
  static __device__ __forceinline__ float pair_sum(unsigned u) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u)); return f.x + f.y;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Nibbles 0,1 (or 2,3) of the low 16 bits of h as two 16-bit floats OFF + q.
__device__ __forceinline__ unsigned nibbles01(unsigned h, unsigned pair) { return (h & 0xFu) | ((h & 0xF0u) << 12) | pair; }
__device__ __forceinline__ unsigned nibbles23(unsigned h, unsigned pair) { return ((h >> 8) & 0xFu) | ((h & 0xF000u) << 4) | pair; }

template <typename T, int M, int NT>
__global__ void __launch_bounds__(256) mma_int4_kernel(
    const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales, const T* __restrict__ zs,
    T* __restrict__ y, int N, int K, int B, int group) {
  using Op = MmaOf<T>;
  extern __shared__ float reduce[];                          // [warps][M * 16 rows][NT * 8 batch rows]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K >> 7, n_groups = K / group, vec_per_row = K >> 5;
  const int row0 = blockIdx.x * (M * 16);
  float acc[M][NT][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.f;
  for (int c = warp; c < chunks; c += warps) {
    uint4 wa[M], wb[M];                                      // rows g and g + 8 of each 16-row tile
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int ra = min(row0 + m * 16 + g, N - 1), rb = min(row0 + m * 16 + g + 8, N - 1);
      wa[m] = __ldcs(qw + (size_t)ra * vec_per_row + c * 4 + t);
      wb[m] = __ldcs(qw + (size_t)rb * vec_per_row + c * 4 + t);
    }
    unsigned xw[NT][16];                                     // x[batch 8n + g][this thread's 32 columns], in pairs
    float xsum[NT][2];                                       // sum of the chunk's x for batch rows 8n + 2t, 8n + 2t + 1
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int b = n * 8 + g;
      float s = 0.f;
      if (b < B) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)b * K + c * 128 + t * 32);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const uint4 r = __ldg(xp + v);
          xw[n][4 * v] = r.x; xw[n][4 * v + 1] = r.y; xw[n][4 * v + 2] = r.z; xw[n][4 * v + 3] = r.w;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 16; ++j) xw[n][j] = 0u;
      }
#pragma unroll
      for (int j = 0; j < 16; ++j) s += Op::pair_sum(xw[n][j]);
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      xsum[n][0] = __shfl_sync(0xffffffffu, s, 8 * t);
      xsum[n][1] = __shfl_sync(0xffffffffu, s, 8 * t + 4);
    }
    const int grp = (c << 7) / group;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const unsigned a_words[4] = {wa[m].x, wa[m].y, wa[m].z, wa[m].w};
      const unsigned b_words[4] = {wb[m].x, wb[m].y, wb[m].z, wb[m].w};
      float part[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[n][i] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {                          // k-tile i: this thread's columns 4i .. 4i + 3
        const unsigned ha = a_words[i >> 1] >> (16 * (i & 1)), hb = b_words[i >> 1] >> (16 * (i & 1));
        const unsigned frag[4] = {nibbles01(ha, Op::kPair), nibbles01(hb, Op::kPair),
                                  nibbles23(ha, Op::kPair), nibbles23(hb, Op::kPair)};
#pragma unroll
        for (int n = 0; n < NT; ++n) Op::mma(part[n], frag, xw[n][2 * i], xw[n][2 * i + 1]);
      }
      const int ra = min(row0 + m * 16 + g, N - 1), rb = min(row0 + m * 16 + g + 8, N - 1);
      const float sa = to_float(scales[(size_t)ra * n_groups + grp]), za = to_float(zs[(size_t)ra * n_groups + grp]);
      const float sb = to_float(scales[(size_t)rb * n_groups + grp]), zb = to_float(zs[(size_t)rb * n_groups + grp]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[m][n][0] += sa * (part[n][0] - Op::kOffset * xsum[n][0]) - za * xsum[n][0];
        acc[m][n][1] += sa * (part[n][1] - Op::kOffset * xsum[n][1]) - za * xsum[n][1];
        acc[m][n][2] += sb * (part[n][2] - Op::kOffset * xsum[n][0]) - zb * xsum[n][0];
        acc[m][n][3] += sb * (part[n][3] - Op::kOffset * xsum[n][1]) - zb * xsum[n][1];
      }
    }
  }
  constexpr int rows = M * 16, cols = NT * 8;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      float* top = reduce + ((size_t)warp * rows + m * 16 + g) * cols + n * 8 + 2 * t;
      top[0] = acc[m][n][0]; top[1] = acc[m][n][1];
      top[8 * cols] = acc[m][n][2]; top[8 * cols + 1] = acc[m][n][3];
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, b = idx % cols;
    if (b >= B || row0 + r >= N) continue;
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += reduce[w * rows * cols + idx];
    y[(size_t)b * N + row0 + r] = from_float<T>(s);
  }
}

template <typename T, int M, int NT>
void launch_mma(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                const torch::Tensor& zs, torch::Tensor& y, int warps, int group) {
  const int N = qweight.size(0), K = qweight.size(1) * 8, B = x.size(0);
  const int blocks = (N + M * 16 - 1) / (M * 16);
  const size_t shared = sizeof(float) * warps * M * 16 * NT * 8;
  mma_int4_kernel<T, M, NT><<<blocks, warps * 32, shared, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), reinterpret_cast<const T*>(zs.data_ptr()),
      reinterpret_cast<T*>(y.data_ptr()), N, K, B, group);
}

template <typename T>
void dispatch_mma(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                  const torch::Tensor& zs, torch::Tensor& y, int64_t m_tiles, int64_t n_tiles, int64_t warps, int64_t group) {
#define SWEEP_CASE(M_, NT_) \
  if (m_tiles == M_ && n_tiles == NT_) return launch_mma<T, M_, NT_>(x, qweight, scales, zs, y, warps, group);
  SWEEP_CASE(1, 1) SWEEP_CASE(2, 1) SWEEP_CASE(4, 1) SWEEP_CASE(1, 2) SWEEP_CASE(2, 2) SWEEP_CASE(1, 4) SWEEP_CASE(2, 4)
#undef SWEEP_CASE
  TORCH_CHECK(false, "mma_int4: no kernel for m_tiles=", m_tiles, " n_tiles=", n_tiles);
}

torch::Tensor mma_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zs,
                       int64_t group, int64_t m_tiles, int64_t n_tiles, int64_t warps) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8, B = x.size(0);
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && x.size(1) == K, "mma_int4: x must be a contiguous CUDA [rows, ", K, "]");
  TORCH_CHECK(B >= 1 && B <= 8 * n_tiles, "mma_int4: ", B, " rows need n_tiles >= ", (B + 7) / 8);
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "mma_int4: qweight must be contiguous int32");
  TORCH_CHECK(K % 128 == 0 && group % 128 == 0 && K % group == 0, "mma_int4: in_features ", K, " and group ", group, " must be multiples of 128");
  TORCH_CHECK(warps >= 1 && warps <= 8, "mma_int4: 1 to 8 warps per block");
  TORCH_CHECK(scales.dtype() == x.dtype() && zs.dtype() == x.dtype(), "mma_int4: scales and zs must have x's dtype");
  auto y = torch::empty({B, N}, x.options());
  if (x.scalar_type() == torch::kBFloat16)
    dispatch_mma<__nv_bfloat16>(x, qweight, scales, zs, y, m_tiles, n_tiles, warps, group);
  else if (x.scalar_type() == torch::kHalf)
    dispatch_mma<__half>(x, qweight, scales, zs, y, m_tiles, n_tiles, warps, group);
  else
    TORCH_CHECK(false, "mma_int4: x must be bfloat16 or float16");
  return y;
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zs,
                        int64_t group, int64_t rows_per_block, int64_t per_thread, int64_t rows_per_step) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8;
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.numel() == K, "gemv_int4: x must be a contiguous CUDA vector of ", K);
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "gemv_int4: qweight must be contiguous int32");
  TORCH_CHECK(K % (32 * per_thread) == 0 && (K / (32 * per_thread)) % 32 == 0 && K / (32 * per_thread) <= 512,
              "gemv_int4: in_features ", K, " needs a whole number of warps of ", per_thread, " x 32 columns (at most 512 threads)");
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "gemv_int4: group ", group, " must be a multiple of 32 dividing ", K);
  TORCH_CHECK(rows_per_block % rows_per_step == 0, "gemv_int4: rows_per_block must be a multiple of rows_per_step");
  TORCH_CHECK(scales.dtype() == x.dtype() && zs.dtype() == x.dtype(), "gemv_int4: scales and zs must have x's dtype");
  auto y = torch::empty({1, N}, x.options());
  if (x.scalar_type() == torch::kBFloat16)
    dispatch<__nv_bfloat16>(x, qweight, scales, zs, y, rows_per_block, group, per_thread, rows_per_step);
  else if (x.scalar_type() == torch::kHalf)
    dispatch<__half>(x, qweight, scales, zs, y, rows_per_block, group, per_thread, rows_per_step);
  else
    TORCH_CHECK(false, "gemv_int4: x must be bfloat16 or float16");
  return y;
}
"""


@functools.lru_cache(maxsize=None)
def extension():
    """Compile (first call on a machine: ~1 min with nvcc; cached by torch afterwards) and load."""
    from torch.utils.cpp_extension import load_inline
    return load_inline(name="sweep_gemv_int4", cpp_sources="torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor qweight, "
                       "torch::Tensor scales, torch::Tensor zs, int64_t group, int64_t rows_per_block, "
                       "int64_t per_thread, int64_t rows_per_step);\n"
                       "torch::Tensor mma_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, "
                       "torch::Tensor zs, int64_t group, int64_t m_tiles, int64_t n_tiles, int64_t warps);",
                       cuda_sources=_SOURCE, functions=["gemv_int4", "mma_int4"],
                       extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"]
                       + (["-Xptxas", "-v"] if os.environ.get("SWEEP_VERBOSE_BUILD") else []),
                       verbose=bool(os.environ.get("SWEEP_VERBOSE_BUILD")))


def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
              rows_per_block: int = 8, per_thread: int = 1, rows_per_step: int = 4) -> torch.Tensor:
    """y [1, out] = x [1, in] @ dequantized(W)ᵀ, in x's dtype (bfloat16 or float16)."""
    x = x.reshape(-1)
    if x.data_ptr() % 16:  # the kernel reads x in 16-byte vectors
        x = x.clone()
    return extension().gemv_int4(x.contiguous(), qweight, scales, zs, group_size, rows_per_block,
                                 per_thread, rows_per_step)


# An opaque op for torch.compile: the compiled CUDA-graph decode step sees one node, not a pybind call.
@torch.library.custom_op("sweep::gemv_int4", mutates_args=())
def gemv_int4_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
                 rows_per_block: int, per_thread: int, rows_per_step: int) -> torch.Tensor:
    return gemv_int4(x, qweight, scales, zs, group_size, rows_per_block, per_thread, rows_per_step)


@gemv_int4_op.register_fake
def _(x, qweight, scales, zs, group_size, rows_per_block, per_thread, rows_per_step):
    return x.new_empty((1, qweight.shape[0]))


def mma_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
             m_tiles: int = 1, n_tiles: int = 1, warps: int = 4) -> torch.Tensor:
    """y [rows, out] = x [rows, in] @ dequantized(W)ᵀ on the tensor cores, rows <= 8 * n_tiles; every packed
    weight is read once for all the rows (in_features and group_size multiples of 128)."""
    if x.data_ptr() % 16:
        x = x.clone()
    return extension().mma_int4(x.contiguous(), qweight, scales, zs, group_size, m_tiles, n_tiles, warps)


@torch.library.custom_op("sweep::mma_int4", mutates_args=())
def mma_int4_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
                m_tiles: int, n_tiles: int, warps: int) -> torch.Tensor:
    return mma_int4(x, qweight, scales, zs, group_size, m_tiles, n_tiles, warps)


@mma_int4_op.register_fake
def _(x, qweight, scales, zs, group_size, m_tiles, n_tiles, warps):
    return x.new_empty((x.shape[0], qweight.shape[0]))


class GemvInt4Error(ValueError):
    pass


def shape_errors(in_features: int, group_size: int) -> List[str]:
    """What keeps a layer of this shape off the kernel: a thread owns 32 input columns and a block
    is whole warps of threads (at most 512), so in_features must be a multiple of 1024 (≤ 32768)."""
    errors = []
    if in_features % 1024 or in_features > 32768:
        errors.append(f"in_features {in_features} is not a multiple of 1024 up to 32768")
    if group_size % 32 or in_features % group_size:
        errors.append(f"group_size {group_size} is not a multiple of 32 dividing in_features {in_features}")
    return errors


def group_size_option_errors(group_size: int) -> List[str]:
    """The config error for a group size the kernel cannot run (checked before any load)."""
    if group_size != -1 and group_size % 32 == 0:
        return []
    return [f"group_size={group_size!r} is not allowed with method.kernel={KERNEL!r}: a multiple of 32 (e.g. 32, 64, 128)"]


def model_shape_errors(kernel: str, in_features: Dict[str, int], group_size: int, model_name: str) -> List[str]:
    """With method.kernel=gemv_int4 (`kernel`), the config error for a model whose linears the kernel
    cannot run, from its config's in_features
    (what sets each: hidden_size, intermediate_size, ...), so it is refused before loading, not after
    quantizing."""
    ragged = {what: n for what, n in in_features.items() if shape_errors(n, group_size)}
    if kernel != KERNEL or not ragged:
        return []
    listing = "; ".join(f"{what} = {n}: {', '.join(shape_errors(n, group_size))}" for what, n in ragged.items())
    return [f"method.kernel={KERNEL!r} cannot run model {model_name!r} ({listing}); use method.kernel=auto or "
            f"tinygemm_int4 for this model"]


def tile_for(in_features: int, out_features: int) -> Tuple[int, int, int]:
    """(rows_per_block, per_thread, rows_per_step), the best of benchmarks/device/int4_gemv.py on the
    H200 (2026-12-02): two 16-byte vectors per thread and row, four rows per step; 16 rows per block
    for the long inputs (down_proj) and the wide head, 8 otherwise."""
    per_thread = 2 if in_features % 2048 == 0 and in_features // 64 >= 32 else 1
    if in_features // (32 * per_thread) > 512:
        per_thread = 4
    rows = 16 if in_features > 8192 or out_features >= 65536 else 8
    return rows, per_thread, 4


# Up to this many input rows run as one GEMV each (each reads the packed weights once: 4.25 bits per
# weight and row) where the tensor-core kernel cannot run (groups not a multiple of 128); more rows
# dequantize to a float weight and run one matmul (read 4.25 bits, write and read 16 per weight), which
# costs about as much as 8 GEMVs. Byte arithmetic, not a measured crossover.
GEMV_MAX_ROWS = 8
# The tensor-core kernel takes up to MMA_ROWS rows per call (each call reads the packed weights once);
# up to MMA_MAX_ROWS rows (decode at batch 64: two calls) it runs, above that (a prompt) the dequantized matmul.
MMA_ROWS = 32
MMA_MAX_ROWS = 64


def mma_shape_errors(in_features: int, group_size: int) -> List[str]:
    """What keeps a layer off the tensor-core kernel (it then runs one GEMV per row): 128-column chunks,
    each inside one quantization group."""
    if in_features % 128 == 0 and group_size % 128 == 0 and in_features % group_size == 0:
        return []
    return [f"in_features {in_features} and group_size {group_size} must be multiples of 128"]


def mma_tile_for(out_features: int, rows: int) -> Tuple[int, int, int]:
    """(m_tiles, n_tiles, warps) for `rows` input rows: n_tiles 8-row tiles of the batch (1, 2 or 4), and
    16-row weight tiles per block so that even the 4096-row shapes give every SM several blocks."""
    n_tiles = 1 if rows <= 8 else 2 if rows <= 16 else 4
    m_tiles = 2 if out_features >= 16384 else 1
    return m_tiles, n_tiles, 4


class GemvInt4Linear(nn.Module):
    """y = x @ W.T + b with W as 4-bit codes for the project's kernels on CUDA: one input row runs the
    GEMV, 2 to MMA_MAX_ROWS rows the tensor-core kernel (groups of 128: each weight read once for up to
    32 rows; other groups: one GEMV per row up to GEMV_MAX_ROWS).

    Any other call (a prompt's many rows, a CPU tensor) dequantizes the weight and runs an ordinary
    matmul: exact, but it reads several times the bytes, so this layer is for small-batch decode."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype = torch.bfloat16, bias: Optional[torch.Tensor] = None) -> None:
        """codes [out, in] integers 0..15; scales, zeros [out, in // group_size] (zeros as integer codes)."""
        super().__init__()
        out_features, in_features = codes.shape
        problems = shape_errors(in_features, group_size)
        if problems:
            raise GemvInt4Error(f"{KERNEL} cannot run this layer: {'; '.join(problems)}")
        self.in_features, self.out_features, self.group_size, self.dtype = in_features, out_features, group_size, dtype
        qweight, s, zs = pack(codes.to(torch.uint8), scales, zeros, dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", s)
        self.register_buffer("zs", zs)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.tile = tile_for(in_features, out_features)
        self.mma = not mma_shape_errors(in_features, group_size)

    @classmethod
    def concatenate(cls, layers: List["GemvInt4Linear"]) -> "GemvInt4Linear":
        """One layer computing all of `layers` (same input) side by side: rows never interact."""
        first = layers[0]
        if any((layer.in_features, layer.group_size, layer.dtype) != (first.in_features, first.group_size, first.dtype)
               for layer in layers):
            raise GemvInt4Error(f"{KERNEL}: only layers with the same input size, group size and dtype can be fused")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.group_size, fused.dtype = first.in_features, first.group_size, first.dtype
        fused.out_features = sum(layer.out_features for layer in layers)
        for name in ("qweight", "scales", "zs"):
            fused.register_buffer(name, torch.cat([getattr(layer, name) for layer in layers]))
        bias = None
        if any(layer.bias is not None for layer in layers):
            like = next(layer.bias for layer in layers if layer.bias is not None)
            bias = torch.cat([layer.bias if layer.bias is not None else
                              torch.zeros(layer.out_features, dtype=like.dtype, device=like.device) for layer in layers])
        fused.register_buffer("bias", bias)
        fused.tile = tile_for(fused.in_features, fused.out_features)
        fused.mma = first.mma
        return fused

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] weights in the layer's dtype, as the kernel computes them: s·q − z·s."""
        shifts = torch.arange(0, 32, 4, device=self.qweight.device, dtype=torch.int32)
        codes = ((self.qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(self.out_features, self.in_features)
        groups = self.in_features // self.group_size
        codes = codes.reshape(self.out_features, groups, self.group_size).float()
        weight = codes * self.scales.float().unsqueeze(-1) - self.zs.float().unsqueeze(-1)
        return weight.reshape(self.out_features, self.in_features).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        rows = flat.shape[0]
        if flat.is_cuda and (rows == 1 or (rows <= GEMV_MAX_ROWS and not self.mma)):
            parts = [gemv_int4_op(flat[i:i + 1], self.qweight, self.scales, self.zs, self.group_size, *self.tile)
                     for i in range(rows)]
            out = parts[0] if rows == 1 else torch.cat(parts)
        elif flat.is_cuda and self.mma and rows <= MMA_MAX_ROWS:
            parts = [mma_int4_op(flat[i:i + MMA_ROWS], self.qweight, self.scales, self.zs, self.group_size,
                                 *mma_tile_for(self.out_features, min(MMA_ROWS, rows - i)))
                     for i in range(0, rows, MMA_ROWS)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            out = flat @ self.dequantized_weight().t()
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"tile={self.tile}")


def from_gptq_module(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> GemvInt4Linear:
    """The GEMV layer from a 4-bit GPTQModel quant-linear with contiguous groups (same codes, no re-quantization)."""
    from sweep.backends.tinygemm import gptq_module_parts

    codes, scales, zeros, group_size = gptq_module_parts(module, KERNEL)
    layer = GemvInt4Linear(codes, scales.t(), zeros.t(), group_size, dtype=dtype, bias=getattr(module, "bias", None))
    return layer


def is_gemv_layer(module: nn.Module) -> bool:
    return isinstance(module, GemvInt4Linear)


def one_token_probe(model: nn.Module) -> torch.Tensor:
    """The fusion check's input for this kernel: one token, so the check runs the GEMV itself (per-row
    sums: fusing changes nothing); a longer probe compares cuBLAS matmuls of different widths, which
    may round differently."""
    return torch.ones(1, 1, dtype=torch.long, device=next(model.buffers()).device)
