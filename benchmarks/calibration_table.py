"""The tables of docs/calibration.md, read back from the store `+experiment=calibration_study` wrote.

    python -m sweep +experiment=calibration_study -m
    python benchmarks/calibration_table.py --tracking-uri sqlite:///outputs/mlflow.db --experiment smollm2-135m

Per method × bits × group size × calibration source × size: the number of seeds, mean ± std (min-max)
of WikiText-2 word perplexity, LAMBADA perplexity and accuracy, and what the calibration cost (time to
build the windows: tokenization, or generation for self_generated; the first seed of a cell pays it,
later grid points of the same seed reuse the cache). Then, per source × size, GPTQ's gap over RTN at the
same bits and group size, and whether it is larger than the calibration noise: a one-sample t-test of the
seeds' log perplexity (accuracy: the seeds' values) against RTN's single value (RTN takes no calibration,
so it has no seed spread; both are scored on the same items, so evaluation sampling is shared).
Writes the per-run CSV next to --csv when given.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweep.analysis.configs import mean_pm_std, number  # noqa: E402
from sweep.config.schema import TrackingConfig  # noqa: E402
from sweep.tracking.tracker import Tracker, latest_attempts, point_runs  # noqa: E402

METRICS = {"wikitext.word_perplexity": "WikiText-2 word ppl", "lambada.perplexity": "LAMBADA ppl",
           "lambada.acc": "LAMBADA acc"}
CELL = ["method", "bits", "group_size", "source", "size"]


def runs_frame(uri: str, experiment: str) -> pd.DataFrame:
    tracker = Tracker(TrackingConfig(uri=uri, experiment=experiment), experiment)
    rows = []
    for run in latest_attempts(point_runs(tracker)):
        if run.info.status != "FINISHED":
            continue
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        calibrated = t.get("calibration.source", "none") != "none"
        rows.append({
            "method": p.get("method.name"), "bits": int(p.get("bits", 0)), "group_size": int(p.get("group_size", 0)),
            "source": t.get("calibration.source") if calibrated else "-",
            "size": f"{p.get('calibration.nsamples')}x{p.get('calibration.seqlen')}" if calibrated else "-",
            "seed": int(p.get("seed", 0)), "dtype": t.get("dtype"),
            **{k: m.get(k) for k in METRICS},
            "calibrate_s": m.get("time.calibrate_s"), "quantize_s": m.get("time.quantize_s"),
            "run_id": run.info.run_id,
        })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame.loc[frame.method == "fp16", "bits"] = 16   # the baseline's `bits` param is unused
    return frame


def spread(values: pd.Series, digits: int) -> str:
    """mean ± std (min-max) over the seeds, in the report's number format."""
    v = values.dropna()
    if len(v) == 1:
        return number(v.iloc[0], digits)
    return f"{mean_pm_std(v.mean(), v.std(ddof=1), digits)} ({number(v.min(), digits)}-{number(v.max(), digits)})"


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, group in runs.groupby(CELL, sort=True):
        row = dict(zip(CELL, key))
        row["seeds"] = len(group)
        for metric, name in METRICS.items():
            row[name] = spread(group[metric], 4 if metric.endswith("acc") else 1)
        # The first run of a cell builds the windows; the others may have found them cached.
        row["calibration s (max)"] = "-" if group["calibrate_s"].isna().all() else f"{group['calibrate_s'].max():.1f}"
        row["quantize s (mean)"] = f"{group['quantize_s'].mean():.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def gap_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    rtn = runs[runs.method == "rtn"].set_index(["bits", "group_size"])
    for (method, bits, group_size, source, size), group in runs[~runs.method.isin(["rtn", "fp16"])].groupby(CELL):
        if (bits, group_size) not in rtn.index:
            continue
        reference = rtn.loc[(bits, group_size)]
        reference = reference.iloc[0] if isinstance(reference, pd.DataFrame) else reference
        row = {"method": method, "bits": bits, "group_size": group_size, "source": source, "size": size,
               "seeds": len(group)}
        for metric, name in METRICS.items():
            values = group[metric].dropna().to_numpy()
            accuracy = metric.endswith("acc")
            scale = (lambda x: x) if accuracy else np.log
            base = reference[metric]
            if accuracy:
                row[f"{name}: gap"] = f"{values.mean() - base:+.4f}"
            else:
                row[f"{name}: gap"] = f"{100 * (math.exp(np.log(values).mean()) / base - 1):+.0f}%"
            if len(values) >= 2 and np.std(values) > 0:
                p = stats.ttest_1samp(scale(values), scale(base)).pvalue
                row[f"{name}: p"] = f"{p:.3f}"
            else:
                row[f"{name}: p"] = "-"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--csv", help="write every run's row here")
    args = ap.parse_args()
    runs = runs_frame(args.tracking_uri, args.experiment)
    if runs.empty:
        print("no finished runs in", args.tracking_uri, args.experiment)
        return 1
    if args.csv:
        runs.to_csv(args.csv, index=False)
    print(cell_table(runs).to_markdown(index=False))
    print()
    print("Gap over RTN at the same bits and group size (geometric mean of the seeds for perplexity;"
          " negative = better than RTN), one-sample t-test over the seeds:")
    print()
    print(gap_table(runs).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
