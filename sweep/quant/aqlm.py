"""Additive quantization (AQLM: Egiazarian et al., ICML 2024) of one linear layer, in plain torch.

Each output row is cut into groups of `in_group_size` consecutive weights; a group is stored as
`num_codebooks` codes, one per codebook of 2**nbits_per_codebook vectors, and decoded as the sum of
the chosen vectors times the row's scale. So a weight costs num_codebooks * nbits_per_codebook /
in_group_size bits of codes, plus the codebooks and scales (counted by `storage_bits`).

What is minimised is the layer's output error on the calibration inputs, ‖(W - Ŵ) X‖², which for
H = X Xᵀ / n is Σ_rows e H eᵀ with e = w - ŵ (H damped on its diagonal, as in GPTQ; the reported
errors are under the damped H). Written from the paper's algorithm:
1. scales: each row's RMS, so the codebooks see rows of unit scale;
2. codebooks initialised by residual k-means (codebook m clusters what codebooks < m left over);
3. alternate `rounds` times: (a) codes by beam search, group by group: with every other group fixed,
   the output error is a quadratic in the group's decoded vector, and for each codebook in turn every
   hypothesis in the beam tries all of that codebook's vectors; (b) codebooks and scales by Adam on
   the output error with the codes fixed.
Rows never interact (e H eᵀ per row), so every step runs over all rows at once. Float32 throughout,
deterministic for a given seed on a given device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class AQLMSearch:
    """How long the quantizer searches (method=aqlm's options take these over: conf/method/aqlm.yaml)."""

    rounds: int = 3              # beam search + codebook update, alternated
    beam_size: int = 4
    kmeans_iters: int = 10
    codebook_steps: int = 50     # Adam steps per round
    codebook_lr: float = 1e-3


@dataclass
class AQLMSettings(AQLMSearch):
    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    # λ = damp · mean(diag H) added to H's diagonal, as GPTQ does: with fewer calibration tokens than
    # inputs H is singular, and without it codes and codebooks fit the calibration subspace only.
    damp: float = 0.01
    seed: int = 0

    @property
    def code_bits(self) -> float:
        """Bits of codes per weight."""
        return self.num_codebooks * self.nbits_per_codebook / self.in_group_size


@dataclass
class AQLMResult:
    codes: torch.Tensor       # [out, in // in_group_size, num_codebooks], int64 in [0, 2**nbits)
    codebooks: torch.Tensor   # [num_codebooks, 2**nbits, in_group_size], float32
    scales: torch.Tensor      # [out], float32
    initial_loss: float       # relative output error after k-means, before any beam search
    loss: float               # relative output error Σ e H eᵀ / Σ w H wᵀ of the result

    @property
    def weight(self) -> torch.Tensor:
        return reconstruct(self.codes, self.codebooks, self.scales)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Ŵ [out, in]: per row and group, the sum of the coded vectors, times the row's scale."""
    out, groups, num_codebooks = codes.shape
    vectors = sum(codebooks[m][codes[:, :, m]] for m in range(num_codebooks))  # [out, groups, g]
    return vectors.reshape(out, -1) * scales[:, None]


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Σ e H eᵀ / Σ w H wᵀ: the share of the layer's output energy on the calibration inputs that is lost."""
    E = W - W_hat
    return ((E @ H) * E).sum() / ((W @ H) * W).sum().clamp_min(1e-30)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator):
    """Lloyd's k-means of the rows of x [n, d] from k distinct rows picked by `generator`:
    (centroids [k, d], assignment [n]). An emptied cluster restarts at the point worst served."""
    n = x.shape[0]
    start = torch.randperm(n, generator=generator, device="cpu")[:k].to(x.device)
    centroids = x[start].clone()
    if n < k:  # fewer points than codes: the spare codes repeat the points
        centroids = x[torch.arange(k, device=x.device) % n].clone()
    assignment = _nearest(x, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any() and n >= k:
            worst = (x - centroids[assignment]).pow(2).sum(1).topk(int(empty.sum())).indices
            centroids[empty] = x[worst]
        assignment = _nearest(x, centroids)
    return centroids, assignment


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    c_sq = centroids.pow(2).sum(1)
    return torch.cat([(c_sq - 2 * part @ centroids.T).argmin(1) for part in x.split(chunk)])


def aqlm_quantize(W: torch.Tensor, H: torch.Tensor, settings: AQLMSettings,
                  progress: Optional[Callable[[str], None]] = None) -> AQLMResult:
    """Codes, codebooks and scales for W [out, in] minimising its output error under H [in, in]."""
    s = settings
    W = W.detach().float()
    H = H.detach().float()
    out, cols = W.shape
    H = H + s.damp * torch.diag(H).mean().clamp_min(1e-12) * torch.eye(cols, device=H.device)
    g, M, K = s.in_group_size, s.num_codebooks, 2 ** s.nbits_per_codebook
    if cols % g:
        raise ValueError(f"in_features={cols} is not a multiple of in_group_size={g}")
    generator = torch.Generator(device="cpu").manual_seed(s.seed)

    scales = W.pow(2).mean(1).sqrt().clamp_min(1e-8)
    residual = (W / scales[:, None]).reshape(-1, g)
    codebooks = torch.empty(M, K, g, device=W.device)
    codes = torch.empty(out * cols // g, M, dtype=torch.long, device=W.device)
    for m in range(M):
        codebooks[m], codes[:, m] = kmeans(residual, K, s.kmeans_iters, generator)
        residual = residual - codebooks[m][codes[:, m]]
    codes = codes.reshape(out, cols // g, M)
    initial = loss = float(relative_error(W, reconstruct(codes, codebooks, scales), H))

    for r in range(s.rounds):
        codes = beam_search(W, H, codes, codebooks, scales, s.beam_size)
        codebooks, scales, loss = refine_codebooks(W, H, codes, codebooks, scales, s.codebook_steps, s.codebook_lr)
        if progress is not None:
            progress(f"round {r + 1}/{s.rounds}: relative error {loss:.4g}")
    return AQLMResult(codes=codes, codebooks=codebooks, scales=scales, initial_loss=initial, loss=loss)


@torch.no_grad()
def beam_search(W, H, codes, codebooks, scales, beam_size: int, block: int = 128) -> torch.Tensor:
    """One pass over the input groups, left to right, re-choosing each group's codes for every row.

    With every other group fixed, row i's error as a function of its group-J vector v is (up to a
    constant) s² vᵀ H_JJ v - 2 s v·b, where b = H_J,: e + s H_JJ v_now (e: the current error). The
    beam starts from the current codes, so a group never gets worse than it was. E H is kept for a
    block of columns at a time and updated by each group's change (one large product per block
    instead of a skinny one per group, which a CPU runs ~10x slower per FLOP)."""
    out, groups, M = codes.shape
    K, g = codebooks.shape[1], codebooks.shape[2]
    codes = codes.clone()
    E = W - reconstruct(codes, codebooks, scales)
    s = scales[:, None]                                                     # [out, 1]
    per_block = max(1, block // g)
    for first in range(0, groups, per_block):
        cols = slice(first * g, min(groups, first + per_block) * g)
        EH = E @ H[:, cols]                                                  # [out, block cols]
        for j in range(first, min(groups, first + per_block)):
            J = slice(j * g, (j + 1) * g)
            local = slice(J.start - cols.start, J.stop - cols.start)
            H_JJ = H[J, J]
            v_now = sum(codebooks[m][codes[:, j, m]] for m in range(M))     # [out, g]
            b = EH[:, local] + s * (v_now @ H_JJ)                             # [out, g]
            beam = codes[:, j, :].unsqueeze(1)                               # [out, 1, M]
            vecs = v_now.unsqueeze(1)                                        # [out, 1, g]
            for m in range(M):
                C = codebooks[m]                                             # [K, g]
                base = vecs - C[beam[:, :, m]]                               # [out, B, g] without codebook m
                B = base.shape[1]
                # cost(base + C_k) = s² (uHu + 2 uH·C_k + C_k H C_k) - 2 s (u·b + C_k·b)
                uH = (base.reshape(-1, g) @ H_JJ).reshape(out, B, g)
                cross = (uH.reshape(-1, g) @ C.T).reshape(out, B, K)
                constant = s * s * (uH * base).sum(-1) - 2 * s * (base * b[:, None]).sum(-1)      # [out, B]
                cost = (s * s)[:, :, None] * (2 * cross + ((C @ H_JJ) * C).sum(-1)) \
                    - 2 * s[:, :, None] * (b @ C.T)[:, None] + constant[:, :, None]
                width = min(beam_size, B * K)
                best = cost.reshape(out, B * K).topk(width, largest=False).indices   # [out, width]
                parent, choice = best // K, best % K
                beam = torch.gather(beam, 1, parent[:, :, None].expand(-1, -1, M)).clone()
                beam[:, :, m] = choice
                vecs = torch.gather(base, 1, parent[:, :, None].expand(-1, -1, g)) + C[choice]
            codes[:, j, :] = beam[:, 0]  # topk sorts: the first hypothesis is the best
            new_error = W[:, J] - s * vecs[:, 0]
            EH += (new_error - E[:, J]) @ H[J, cols]
            E[:, J] = new_error
    return codes


@torch.no_grad()
def refine_codebooks(W, H, codes, codebooks, scales, steps: int, lr: float):
    """Codebooks and (log-)scales by Adam on the relative output error, codes fixed (never worse than
    given), and that error.

    The gradient is written out rather than taken by autograd, whose backward of the codebook lookup
    accumulates in a thread-dependent order: this way a seed gives the same codebooks bit for bit.
    With G = ∂L/∂Ŵ = -2 (W - Ŵ) H / Σ w H wᵀ: ∂L/∂C_m[k] sums s·G over the groups coded k in codebook
    m, and ∂L/∂log s sums G·Ŵ along the row."""
    out, groups, M = codes.shape
    K, g = codebooks.shape[1], codebooks.shape[2]
    norm = ((W @ H) * W).sum().clamp_min(1e-30)
    flat_codes = codes.reshape(-1, M)
    start = float(relative_error(W, reconstruct(codes, codebooks, scales), H))
    params = [codebooks.clone(), scales.log()]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        books, log_scales = params
        W_hat = reconstruct(codes, books, log_scales.exp())
        G = -2 * ((W - W_hat) @ H) / norm
        scaled = (G * log_scales.exp()[:, None]).reshape(-1, g)
        params[0].grad = torch.stack([torch.zeros(K, g, device=W.device).index_add_(0, flat_codes[:, m], scaled)
                                      for m in range(M)])
        params[1].grad = (G * W_hat).sum(1)
        optimizer.step()
    books, scales_now = params[0], params[1].exp()
    error = float(relative_error(W, reconstruct(codes, books, scales_now), H))
    if error < start:
        return books, scales_now, error
    return codebooks, scales, start  # Adam overshot: keep what came in


def storage_bits(out_features: int, in_features: int, settings: AQLMSettings, float_bits: int = 16) -> float:
    """Bits per weight as stored: codes, plus the codebooks and one scale per row in `float_bits`."""
    s = settings
    weights = out_features * in_features
    codes = weights * s.code_bits
    codebooks = s.num_codebooks * 2 ** s.nbits_per_codebook * s.in_group_size * float_bits
    return (codes + codebooks + out_features * float_bits) / weights
