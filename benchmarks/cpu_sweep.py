"""CPU benchmark: the README's 6-point GPTQ grid on the embedded model, timed, into docs/benchmarks.md.

    python benchmarks/cpu_sweep.py            # ~25 min on 2 cores
    python benchmarks/cpu_sweep.py --dry-run  # print the command only

Runs `python -m sweep method=gptq bits=2,3,4 group_size=16,128 -m` plus an fp16 and RTN reference
into its own MLflow store under outputs/bench-cpu/, then appends a dated table (quality, memory and
per-phase wall times read back from the store) to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sweep.config.schema import TrackingConfig  # noqa: E402
from sweep.analysis.table import build_table  # noqa: E402
from sweep.tracking.tracker import Tracker, sweep_runs  # noqa: E402

GRIDS = [
    ["method=fp16,rtn", "bits=4"],
    ["method=gptq", "bits=2,3,4", "group_size=16,128"],
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    store = REPO / "outputs" / "bench-cpu"
    uri = f"sqlite:///{store}/mlflow.db"
    rows = []
    for grid in GRIDS:
        cmd = [sys.executable, "-m", "sweep", *grid, f"tracking.uri={uri}", "tracking.experiment=bench-cpu",
               f"hydra.sweep.dir={store}/sweep-{len(rows)}", "-m"]
        print(" ".join(cmd))
        if args.dry_run:
            continue
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=False)
        rows.append((" ".join(grid), time.perf_counter() - start))
    if args.dry_run:
        return 0
    tracker = Tracker(TrackingConfig(uri=uri, experiment="bench-cpu"), "bench-cpu")
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.`sweep.role` = 'sweep'",
                                         order_by=["attributes.start_time DESC"], max_results=len(GRIDS))
    runs = [r for p in parents for r in sweep_runs(tracker, p.info.run_id)]
    table = build_table(runs)
    times = {r.info.run_id: r.data.metrics for r in runs}
    table["load_s"] = [times[i].get("time.load_s") for i in table.run_id]
    table["eval_s"] = [times[i].get("time.eval_s") for i in table.run_id]
    cols = ["method", "bits", "group_size", "weights", "wikitext_word_ppl", "lambada_ppl", "lambada_acc",
            "weight_mb", "peak_mb", "load_s", "quantize_s", "eval_s", "tokens_per_s", "ttft_ms"]
    cpu = platform.processor() or platform.machine()
    section = [
        f"\n## CPU: the README's GPTQ grid on SmolLM2-135M ({time.strftime('%Y-%m-%d')})\n",
        f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Config defaults: eval=quick (2 WikiText-2 articles, 200 LAMBADA passages), calibration 32×256 tokens "
        "of LAMBADA dev, bench=quick (3 prompts × 2 repeats, 32 new tokens, greedy).\n",
        table[cols].round(3).to_markdown(index=False), "\n",
        "Wall time per sweep (includes process start-up and model loads):\n",
        *[f"- `python -m sweep {g} -m`: {s / 60:.1f} min" for g, s in rows], "",
    ]
    with open(args.out, "a") as f:
        f.write("\n".join(section) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
