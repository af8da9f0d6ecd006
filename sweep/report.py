"""`python -m sweep.report`: the summary table of a sweep, read back from the MLflow store.

One row per configuration (the runs that differ only in their seed, aggregated: mean ± std, 95%
interval, significance against the best configuration and the fp16 baseline), and one row per run
in `-runs` files; columns in a stable order (docs/report.md). Writes CSV and Parquet (full
precision), Markdown and a self-contained HTML page with plots, prints the table, logs the files
back to the sweep's parent run (artifacts `report/`) and prints a link to the sweep's view in the
MLflow UI. With no sweep in the store yet it reports the latest single runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sweep.analysis.configs import summary_view
from sweep.analysis.export import report_tables, write_report
from sweep.analysis.sensitivity import write_heatmap
from sweep.analysis.table import find_baseline, print_table
from sweep.config.schema import TrackingConfig
from sweep.tracking.tracker import TAG_SWEEP_ID, Tracker, find_sweep, latest_sweep, point_runs, sweep_runs
from sweep.tracking.ui import browse_hint, share_view

LATEST = 50   # runs reported when the store holds no sweep yet (newest first)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="smollm2-135m", help="MLflow experiment (default: %(default)s)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db)")
    ap.add_argument("--sweep-id", default=None, help="parent run id or sweep.id tag (default: the latest sweep)")
    ap.add_argument("--all", action="store_true", help="every grid point run in the experiment, not one sweep")
    ap.add_argument("--out", default="outputs/report", help="output folder (default: %(default)s)")
    ap.add_argument("--no-log", action="store_true",
                    help="write nothing to the store (no report artifacts on the parent run, no UI view)")
    ap.add_argument("--recommend", action="store_true",
                    help="print the best finished configuration in the experiment under --budget-mb, and its command")
    ap.add_argument("--budget-mb", type=float, default=None, help="packed weight budget in MB (as weight_mb)")
    args = ap.parse_args(argv)
    if args.recommend and args.budget_mb is None:
        ap.error("--recommend needs --budget-mb")

    tracker = Tracker(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment), args.experiment)
    if args.recommend:
        from sweep.analysis.recommend import print_recommendation  # loads the config tree and the methods

        return print_recommendation(tracker, args.budget_mb)
    parent = None
    if args.all:
        runs = point_runs(tracker)
        title, stem = f"experiment {args.experiment}: all runs", "all"
    elif args.sweep_id:
        parent = find_sweep(tracker, args.sweep_id)
        if parent is None:
            print(f"no sweep {args.sweep_id!r} in experiment {args.experiment!r} at {tracker.uri}", file=sys.stderr)
            return 1
    else:
        parent = latest_sweep(tracker)
        if parent is None:
            runs = point_runs(tracker)[:LATEST]
            if not runs:
                print(f"no runs in experiment {args.experiment!r} at {tracker.uri}: run `python -m sweep` first, "
                      "or pass --experiment / --tracking-uri", file=sys.stderr)
                return 1
            print(f"no sweep in experiment {args.experiment!r} yet: reporting its latest {len(runs)} runs "
                  "(single runs of `python -m sweep`)")
            title, stem = f"experiment {args.experiment}: latest {len(runs)} runs", "latest"
    sweep_id = None
    if parent is not None:
        runs = sweep_runs(tracker, parent.info.run_id)
        sweep_id = parent.data.tags.get(TAG_SWEEP_ID)
        title = f"sweep {sweep_id} ({parent.info.run_name}, {len(runs)} runs)"
        stem = f"sweep-{sweep_id}"
    per_run, per_config = report_tables(runs, tracker.client, sweep_id, find_baseline(tracker, runs))
    paths = write_report(per_run, per_config, Path(args.out) / stem, title, runs, tracker.client)
    print_table(summary_view(per_config), title)
    heatmap = write_heatmap(tracker.client, tracker.experiment_id, Path(args.out))
    paths += [heatmap] if heatmap else []
    for p in paths:
        print(f"wrote {p}")
    if parent is not None and not args.no_log:
        for p in paths:
            tracker.log_file(parent.info.run_id, p, "report")
        print(f"logged to parent run {parent.info.run_id} (artifacts report/)")
        view = share_view(tracker.client, tracker.experiment_id, parent.data.tags.get(TAG_SWEEP_ID))
        print(f"MLflow UI: {browse_hint(tracker.uri, view)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
