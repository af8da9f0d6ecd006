"""`python -m sweep.allocate`: per-layer bits under a weight-memory budget, from a sensitivity run.

The allocation itself is sweep/analysis/allocate.py (its docstring, printed by --help, says how);
this command reads the sensitivity table from the store, writes the result as a config option
`conf/layer_bits/<name>.yaml` and prints the commands that run it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sweep.analysis import allocate as allocation
from sweep.analysis.allocate import DEFAULT_LEVELS, allocate, hydra_dict, write_option
from sweep.analysis.sensitivity import find_sensitivity_runs, load_table
from sweep.config.schema import CONF_DIR, TrackingConfig
from sweep.tracking.tracker import Tracker


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.allocate", description=allocation.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="average storage bits per decoder weight, e.g. 4.25")
    budget.add_argument("--budget-mb", type=float, help="packed weights of the whole model, in MB (as weight_mb)")
    ap.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)),
                    help="allowed bit widths, comma-separated (16 = leave unquantized; default: %(default)s)")
    ap.add_argument("--group-size", type=int, default=None, help="default: the sensitivity run's")
    ap.add_argument("--experiment", default="smollm2-135m", help="MLflow experiment (default: %(default)s)")
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db")
    ap.add_argument("--run-id", default=None, help="sensitivity run (default: the newest finished one)")
    ap.add_argument("--name", default=None, help="config option name (default: <experiment>-<budget>)")
    ap.add_argument("--conf-dir", default=str(CONF_DIR),
                    help="config root; the option goes to <conf-dir>/layer_bits/ (default: the repository's conf/)")
    args = ap.parse_args(argv)

    tracker = Tracker(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment), args.experiment)
    run_id = args.run_id
    if run_id is None:
        runs = find_sensitivity_runs(tracker.client, tracker.experiment_id)
        if not runs:
            print(f"no finished sensitivity run in experiment {args.experiment!r} at {tracker.uri}: run "
                  "`python -m sweep +experiment=sensitivity -m` first", file=sys.stderr)
            return 1
        run_id = runs[0].info.run_id
    table = load_table(tracker.client, run_id)
    try:
        levels = [int(b) for b in args.levels.split(",")]
        alloc = allocate(table, levels, args.budget_bits, args.budget_mb, args.group_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    budget = f"b{args.budget_bits:g}" if args.budget_bits is not None else f"mb{args.budget_mb:g}"
    name = args.name or f"{args.experiment}-{budget}"
    conf_dir = Path(args.conf_dir).resolve()
    path = write_option(alloc, name, f"sensitivity run {run_id} (RTN {table['bits']}-bit)", conf_dir)
    # Outside the repository's conf/, Hydra finds the option through its search path.
    search = "" if conf_dir == CONF_DIR.resolve() else f" --config-dir {conf_dir}"
    counts = {b: sum(1 for v in alloc.bits.values() if v == b) for b in sorted(set(alloc.bits.values()))}
    print(f"allocation from sensitivity run {run_id}: groups per bit width {counts}, "
          f"{alloc.bits_per_weight:.4f} bits per decoder weight, {alloc.packed_mb:.2f} MB packed weights")
    print(f"wrote {path}")
    print(f"run it beside uniform settings:  python -m sweep{search} method=rtn +layer_bits=none,{name} -m")
    print(f"or inline:  python -m sweep method=rtn group_size={alloc.group_size} sym={alloc.sym} "
          f"'+method.layer_bits={hydra_dict(alloc.layer_bits)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
