"""Screenshots for the README: the MLflow UI on a sweep (parent expanded) and its HTML report.

    python benchmarks/ui_screenshots.py --tracking-uri sqlite:///outputs/bench-cpu/mlflow.db --experiment bench-cpu

Needs chromium, chromium-driver and selenium (tests/browser.py). Uses the latest sweep of the
experiment (or --sweep-id), writes its report with `python -m sweep.report` (logged to the
parent run), then checks both pages in headless Chromium and saves docs/mlflow-ui.png and
docs/report.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import browser  # noqa: E402
from sweep import report  # noqa: E402
from sweep.config.schema import TrackingConfig  # noqa: E402
from sweep.tracking.tracker import TAG_PARENT, TAG_SWEEP_ID, Tracker, find_sweep, latest_sweep  # noqa: E402
from sweep.tracking.ui import serve, share_view  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="smollm2-135m")
    ap.add_argument("--sweep-id", default=None)
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args()
    why = browser.missing()
    if why:
        print(f"cannot take screenshots: {why}", file=sys.stderr)
        return 1
    tracker = Tracker(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment), args.experiment)
    parent = find_sweep(tracker, args.sweep_id) if args.sweep_id else latest_sweep(tracker)
    sweep_id = parent.data.tags[TAG_SWEEP_ID]
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    report_dir = REPO / "outputs" / "report"
    report.main(["--experiment", args.experiment, "--tracking-uri", tracker.uri, "--sweep-id", parent.info.run_id,
                 "--out", str(report_dir)])
    path = share_view(tracker.client, tracker.experiment_id, sweep_id)
    out = Path(args.out)
    with serve(tracker.uri) as url:
        driver = browser.start(1600, 900)
        try:
            values = browser.open_sweep_view(driver, url + path, parent.info.run_id,
                                             [c.info.run_id for c in children], "wikitext.word_perplexity")
            print(f"MLflow UI: parent {parent.info.run_name!r} with {len(values)} children visible")
            driver.save_screenshot(str(out / "mlflow-ui.png"))
        finally:
            driver.quit()
    driver = browser.start(1400, 2400)
    try:
        figures = browser.open_report(driver, report_dir / f"sweep-{sweep_id}.html")
        print(f"report: figures rendered {figures}")
        driver.save_screenshot(str(out / "report.png"))
    finally:
        driver.quit()
    print(f"wrote {out / 'mlflow-ui.png'} and {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
