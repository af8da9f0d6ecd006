"""Fewer, larger int4 matmuls per decoder layer: q/k/v as one matmul, gate/up as one.

Why: at batch 1 a tinygemm matmul has a fixed cost besides its weight bytes, so small matmuls
read their weights slowly. On the H100 (docs/benchmarks.md, visit 4) the 4096 x 1024 k/v
projections run at about 0.5 TB/s and q at 1.3, the fused 4096 x 6144 q/k/v at 1.4 and the fused
4096 x 28672 gate/up at 1.9: fusing pays the fixed cost once instead of three and two times per
layer (8B decode 266 -> 291 tokens/s).

Each output column of tinygemm's matmul depends only on that column's codes and group scales,
so the fused matmul reproduces the separate ones; `fuse_projections` checks the model's logits
before and after and fails loudly if they differ.

The MLP is replaced by `FusedGatedMLP` (down(act(gate(x)) * up(x)), the gated MLP of Llama,
Qwen2, Mistral...). The attention module is left as transformers wrote it: its q_proj computes
all three projections and hands k_proj and v_proj their slices, which they take when the
attention calls them next on the same input (`_QKVSlices`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from sweep.backends.tinygemm import TinyGemmError, TinyGemmInt4Linear


class FusedGatedMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with gate and up as one matmul (`gate_up_proj`)."""

    def __init__(self, gate_up_proj: nn.Module, width: int, down_proj: nn.Module, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.width, self.down_proj, self.act_fn = gate_up_proj, width, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class _QKVSlices:
    """What q_proj computed for k_proj and v_proj, until they take it (a plain object: its
    attributes change inside the compiled decode step without breaking the graph)."""

    def __init__(self) -> None:
        self.source: Optional[torch.Tensor] = None
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None


class FusedQKVProjection(nn.Module):
    """Stands in for q_proj: one matmul (`qkv_proj`) for q, k and v; returns q, leaves k and v for their slots."""

    def __init__(self, qkv_proj: nn.Module, sizes: List[int], in_features: int, slices: _QKVSlices) -> None:
        super().__init__()
        self.qkv_proj, self.sizes, self.slices = qkv_proj, list(sizes), slices
        self.in_features, self.out_features = in_features, sizes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(x).split(self.sizes, dim=-1)
        self.slices.source, self.slices.key, self.slices.value = x, key, value
        return query


class QKVSlot(nn.Module):
    """Stands in for k_proj or v_proj: returns the slice q_proj computed from the same input."""

    def __init__(self, slices: _QKVSlices, part: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.slices, self.part = slices, part
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = getattr(self.slices, self.part)
        if result is None or self.slices.source is not x:
            raise RuntimeError(f"fused q/k/v projection: {self.part} was asked for an input q_proj did not see; "
                               "this attention calls its projections differently (set method.fuse_projections=false)")
        setattr(self.slices, self.part, None)
        if self.slices.key is None and self.slices.value is None:
            self.slices.source = None  # both taken: hold no activation past this layer
        return result

    def extra_repr(self) -> str:
        return f"{self.part} slice of the fused q/k/v matmul, out_features={self.out_features}"


def _same_input(fusable, layers) -> bool:
    return all(layer is not None and fusable(layer) and layer.in_features == layers[0].in_features for layer in layers)


def _fusable_mlp(module: nn.Module, fusable) -> bool:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return hasattr(module, "act_fn") and hasattr(module, "down_proj") and _same_input(fusable, [gate, up]) \
        and gate.out_features == up.out_features


def _fusable_attention(module: nn.Module, fusable) -> bool:
    return _same_input(fusable, [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")])


def _is_tinygemm(layer: nn.Module) -> bool:
    return isinstance(layer, TinyGemmInt4Linear) and layer.whole_row_blocks()


@torch.no_grad()
def fuse_projections(model: nn.Module, qkv: bool = True, gate_up: bool = True,
                     fusable: Callable[[nn.Module], bool] = _is_tinygemm,
                     concatenate: Callable[[List[nn.Module]], nn.Module] = TinyGemmInt4Linear.concatenate,
                     probe_ids: Optional[torch.Tensor] = None) -> Dict[str, int]:
    """Fuse every attention's q/k/v and every gated MLP's gate/up whose layers are `fusable`, in place.

    `concatenate(layers)` builds the one layer that computes them all (outputs side by side); the
    default fuses tinygemm layers. The model's logits on a short probe input are compared before
    and after: a model whose attention or MLP uses its projections differently fails here, not in
    its quality numbers. Returns how many attentions and MLPs were fused.
    """
    attentions = [m for m in model.modules() if qkv and _fusable_attention(m, fusable)]
    mlps = [(name, m) for name, m in model.named_modules() if gate_up and _fusable_mlp(m, fusable)]
    if not attentions and not mlps:
        return {"qkv": 0, "gate_up": 0}
    device = next(model.buffers()).device
    if probe_ids is None:
        probe_ids = torch.arange(1, 9, device=device).unsqueeze(0)
    before = model(input_ids=probe_ids, use_cache=False).logits.float()
    for name, mlp in mlps:
        fused = FusedGatedMLP(concatenate([mlp.gate_proj, mlp.up_proj]), mlp.gate_proj.out_features,
                              mlp.down_proj, mlp.act_fn)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fused)
    for attention in attentions:
        slices = _QKVSlices()
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        attention.q_proj = FusedQKVProjection(concatenate([q, k, v]), [q.out_features, k.out_features, v.out_features],
                                              q.in_features, slices)
        attention.k_proj = QKVSlot(slices, "key", k.in_features, k.out_features)
        attention.v_proj = QKVSlot(slices, "value", v.in_features, v.out_features)
    after = model(input_ids=probe_ids, use_cache=False).logits.float()
    # Same codes, scales and reduction per output column: equal in practice (bit for bit on the CPU
    # and in the H100 check); the tolerance only allows for a kernel that tiles K differently.
    error = (after - before).abs().max().item()
    tolerance = 1e-3 * before.abs().max().item() + 1e-5
    if not error <= tolerance:
        raise TinyGemmError(f"fusing q/k/v and gate/up changed the model's logits (max difference "
                            f"{error:.3g} > {tolerance:.3g}); run with method.fuse_projections=false")
    return {"qkv": len(attentions), "gate_up": len(mlps)}

