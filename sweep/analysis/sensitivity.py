"""The per-layer sensitivity table read back from the store: its heat-map, as a PNG and as a report section.

The table is the `sensitivity.json` artifact of a `sensitivity` run (sweep/measure/sensitivity.py
writes it); `python -m sweep.report` saves the newest one's heat-map, and the HTML report embeds it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from sweep.analysis.sections import ReportData, Section
from sweep.measure.artifacts import LM_HEAD, SENSITIVITY_ARTIFACT
from sweep.tracking.tracker import read_artifact

SENSITIVITY_RUNS = "tags.method = 'sensitivity' and attributes.status = 'FINISHED'"


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


def find_sensitivity_runs(client, experiment_id: str, model_path: Optional[str] = None) -> list:
    """Finished sensitivity runs in the experiment, newest first."""
    runs = client.search_runs([experiment_id], filter_string=SENSITIVITY_RUNS,
                              order_by=["attributes.start_time DESC"], max_results=100)
    return [r for r in runs if model_path is None or r.data.params.get("model.path") == model_path]


def load_table(client, run_id: str) -> Dict[str, Any]:
    return json.loads(read_artifact(client, run_id, SENSITIVITY_ARTIFACT))


def write_heatmap(client, experiment_id: str, out_dir: Path, run_id: Optional[str] = None) -> Optional[Path]:
    """`sensitivity-<run>.png` of the given (default: newest) sensitivity run in the experiment;
    None when there is none."""
    import matplotlib.pyplot as plt

    if run_id is None:
        runs = find_sensitivity_runs(client, experiment_id)
        if not runs:
            return None
        run_id = runs[0].info.run_id
    fig = heatmap_figure(load_table(client, run_id))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sensitivity-{run_id[:12]}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def report_section(data: ReportData) -> Optional[Section]:
    """The HTML report's heat-map section: the newest finished sensitivity run in the experiment of
    the report's runs; None when the experiment has none."""
    if not data.runs or data.client is None:
        return None
    runs = find_sensitivity_runs(data.client, data.runs[0].info.experiment_id)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    return Section(title="Per-layer sensitivity", figure=heatmap_figure(load_table(data.client, run_id)),
                   caption=f"Perplexity increase when one layer group alone is quantized (run "
                           f"{run_id[:12]}); <code>python -m sweep.allocate</code> turns it into per-layer bits.")
