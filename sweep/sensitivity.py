"""Per-layer sensitivity: how much the perplexity rises when one group of linears alone is quantized.

A group is one decoder layer's attention linears, or its MLP linears, or lm_head. Each group
is round-to-nearest quantized on its own, the rest of the model staying at the baseline, and
scored with the cheap WikiText probe (sweep/measure/probe.py). The hidden states entering
every layer are computed once for the baseline model, so quantizing a group in layer i only
re-runs layers i.. and the head: about half the cost of a full forward pass per group.

The result is one table (a JSON artifact `sensitivity.json` of one MLflow run, written by the
`sensitivity` method) that `heatmap_figure` draws and sweep/allocate.py turns into per-layer bits.
"""
from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from sweep.quant.grid import qdq_rtn
from sweep.quant.layers import LayerInputs, capture_first_layer_inputs, decoder_layers, quantizable_linears, run_layer

ARTIFACT = "sensitivity.json"
LM_HEAD = "lm_head"
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
    """The sensitivity table of `model` on `tokens` (a 1-D probe), as written to ARTIFACT."""
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


def heatmap_figure(table: Dict[str, Any]):
    """Layers × sub-blocks (attention, MLP) heat-map of the perplexity increase; lm_head in the title.

    Returns a matplotlib Figure (the caller saves it as PNG or embeds it in HTML)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in table["groups"] if r["layer"] is not None]
    blocks = sorted({r["block"] for r in rows}, key=lambda b: (b != "attn", b != "mlp", b))
    n_layers = max(r["layer"] for r in rows) + 1 if rows else 0
    grid = np.full((n_layers, len(blocks)), np.nan)
    for r in rows:
        grid[r["layer"], blocks.index(r["block"])] = r["delta_ppl"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(blocks), 1.2 + 0.22 * n_layers), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_ylabel("decoder layer")
    finite = grid[np.isfinite(grid)]
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            dark = finite.size and value > finite.min() + 0.6 * (finite.max() - finite.min())
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    head = next((r for r in table["groups"] if r["block"] == LM_HEAD), None)
    title = f"perplexity increase, RTN {table['bits']}-bit g{table['group_size']}\n(baseline {table['baseline_ppl']:.2f}"
    title += f"; lm_head {head['delta_ppl']:+.4g})" if head else ")"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="Δ perplexity (probe)")
    return fig


def find_sensitivity_runs(tracker, model_path: Optional[str] = None) -> list:
    """Finished sensitivity runs in the tracker's experiment, newest first."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string="tags.method = 'sensitivity' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=100)
    return [r for r in runs if model_path is None or r.data.params.get("model.path") == model_path]


def load_table(tracker, run_id: str) -> Dict[str, Any]:
    return json.loads(read_artifact(tracker, run_id, ARTIFACT))


def read_artifact(tracker, run_id: str, name: str) -> str:
    """The text of one artifact of a run (without MLflow's download progress bar)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        return Path(tracker.client.download_artifacts(run_id, name, tmp)).read_text()


def write_heatmap(tracker, out_dir: Path, run_id: Optional[str] = None) -> Optional[Path]:
    """`sensitivity-<run>.png` of the given (default: newest) sensitivity run in the tracker's
    experiment; None when there is none. The report calls this; an HTML page can embed
    `heatmap_figure(load_table(tracker, run_id))` directly."""
    import matplotlib.pyplot as plt

    if run_id is None:
        runs = find_sensitivity_runs(tracker)
        if not runs:
            return None
        run_id = runs[0].info.run_id
    fig = heatmap_figure(load_table(tracker, run_id))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sensitivity-{run_id[:12]}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def report_section(data):
    """The HTML report's heat-map section (sweep/report_html.py): the newest finished sensitivity run
    in the experiment of the report's runs; None when the experiment has none."""
    import os

    from sweep.report_html import Section

    if not data.runs or data.client is None:
        return None
    runs = data.client.search_runs(
        [data.runs[0].info.experiment_id],
        filter_string="tags.method = 'sensitivity' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(data.client.download_artifacts(runs[0].info.run_id, ARTIFACT, tmp)).read_text())
    return Section(title="Per-layer sensitivity", figure=heatmap_figure(table),
                   caption=f"Perplexity increase when one layer group alone is quantized (run "
                           f"{runs[0].info.run_id[:12]}); <code>python -m sweep.allocate</code> turns it into "
                           "per-layer bits.")
