"""Per-layer sensitivity: how much the perplexity rises when one group of linears alone is quantized.

A group is one decoder layer's attention linears, or its MLP linears, or lm_head. Each group
is round-to-nearest quantized on its own, the rest of the model staying at the baseline, and
scored with the cheap WikiText probe (sweep/measure/probe.py). The hidden states entering
every layer are computed once for the baseline model, so quantizing a group in layer i only
re-runs layers i.. and the head: about half the cost of a full forward pass per group.

The result is one table (a JSON artifact `sensitivity.json` of one MLflow run, written by the
`sensitivity` method) that sweep/analysis/sensitivity.py draws as a heat-map and
sweep/analysis/allocate.py turns into per-layer bits.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from sweep.measure.artifacts import LM_HEAD
from sweep.quant.grid import qdq_rtn
from sweep.quant.layers import LayerInputs, capture_first_layer_inputs, decoder_layers, quantizable_linears, run_layer

# Short names of a decoder layer's sub-blocks (the first component of a linear's name in the layer).
BLOCK_NAMES = {"self_attn": "attn", "attention": "attn", "attn": "attn", "mlp": "mlp", "feed_forward": "mlp"}


@dataclass
class LayerGroup:
    name: str                     # "layers.3.attn", "layers.3.mlp", "lm_head"
    layer: Optional[int]          # decoder layer index; None for lm_head
    block: str                    # "attn", "mlp", ... or "lm_head"
    pattern: str                  # a method.layer_bits pattern that selects exactly these modules
    modules: Dict[str, nn.Linear]


def layer_groups(model: nn.Module, include_lm_head: bool) -> List[LayerGroup]:
    """Every decoder layer's linears split by sub-block (attention vs MLP), plus lm_head if asked."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    linears = quantizable_linears(model, include_lm_head=include_lm_head)
    groups: Dict[str, LayerGroup] = {}
    for name, linear in linears.items():
        if name == LM_HEAD:
            groups[LM_HEAD] = LayerGroup(LM_HEAD, None, LM_HEAD, LM_HEAD, {name: linear})
            continue
        index, sub = name[len(prefix) + 1:].split(".", 2)[:2]
        block = BLOCK_NAMES.get(sub, sub)
        key = f"layers.{index}.{block}"
        group = groups.setdefault(key, LayerGroup(key, int(index), block, f"layers.{index}.{sub}.*", {}))
        group.modules[name] = linear
    return list(groups.values())


@contextmanager
def rtn_quantized(modules: Dict[str, nn.Linear], bits: int, group_size: int, sym: bool) -> Iterator[None]:
    """The modules' weights round-to-nearest quantized inside the block, restored after it."""
    saved = {name: lin.weight.data.clone() for name, lin in modules.items()}
    try:
        for lin in modules.values():
            lin.weight.data.copy_(qdq_rtn(lin.weight.data, bits, group_size, sym))
        yield
    finally:
        for name, lin in modules.items():
            lin.weight.data.copy_(saved[name])


def _head_nll(model: nn.Module, hidden: Sequence[torch.Tensor], windows: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss of the final hidden states through the final norm and lm_head."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    nll, count = 0.0, 0
    for h, ids in zip(hidden, windows):
        logits = head(norm(h) if norm is not None else h)[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum"))
        count += ids.shape[1] - 1
    return nll / count


@torch.no_grad()
def measure_sensitivity(model: nn.Module, tokens: torch.Tensor, seqlen: int, bits: int, group_size: int, sym: bool,
                        include_lm_head: bool, progress) -> Dict[str, Any]:
    """The sensitivity table of `model` on `tokens` (a 1-D probe), as written to SENSITIVITY_ARTIFACT
    (sweep/measure/artifacts.py)."""
    device = next(model.parameters()).device
    windows = [tokens[s:s + seqlen].unsqueeze(0).to(device) for s in range(0, len(tokens), seqlen)
               if len(tokens[s:s + seqlen]) >= 2]
    fixed_bits = _bits_outside_decoder_linears(model)
    layers = decoder_layers(model)
    first = capture_first_layer_inputs(model, windows)
    states = [first.hidden]                 # states[i]: what enters decoder layer i (baseline model)
    for layer in layers:
        states.append(run_layer(layer, LayerInputs(states[-1], first.kwargs)))
    base_nll = _head_nll(model, states[-1], windows)
    rows = []
    groups = layer_groups(model, include_lm_head)
    for group in progress.track(groups, "sensitivity", total=len(groups)):
        with rtn_quantized(group.modules, bits, group_size, sym):
            hidden = states[group.layer] if group.layer is not None else states[-1]
            for index in range(group.layer if group.layer is not None else len(layers), len(layers)):
                hidden = run_layer(layers[index], LayerInputs(hidden, first.kwargs))
            nll = _head_nll(model, hidden, windows)
        rows.append({"group": group.name, "layer": group.layer, "block": group.block, "pattern": group.pattern,
                     "modules": {n: [m.in_features, m.out_features] for n, m in group.modules.items()},
                     "ppl": math.exp(nll), "delta_ppl": math.exp(nll) - math.exp(base_nll),
                     "delta_nll": nll - base_nll})
    return {"bits": bits, "group_size": group_size, "sym": sym, "baseline_ppl": math.exp(base_nll),
            "probe_tokens": int(sum(w.shape[1] for w in windows)), "fixed_bits": fixed_bits, "groups": rows}


def _bits_outside_decoder_linears(model: nn.Module) -> float:
    """Bits of every parameter and buffer other than the decoder linears' weights, at their dtype
    (what `memory.packed_weights_mb` counts for them), so a budget in MB can be turned into bits."""
    targets = {id(m.weight) for m in quantizable_linears(model, include_lm_head=False).values()}
    seen, total = set(), 0.0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen and id(tensor) not in targets:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size() * 8
    return total


def table_metrics(table: Dict[str, Any]) -> Dict[str, float]:
    metrics = {"sensitivity.baseline_ppl": table["baseline_ppl"], "sensitivity.groups": float(len(table["groups"]))}
    for row in table["groups"]:
        metrics[f"sensitivity.{row['group']}.delta_ppl"] = row["delta_ppl"]
    return metrics
