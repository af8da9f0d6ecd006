"""The report as data and as files: the per-run and per-configuration tables, CSV/Parquet/Markdown and the HTML page.

`<stem>.csv` / `.parquet` hold one row per configuration (runs over seeds aggregated) at full
precision, `<stem>.md` its summary view, `<stem>-runs.csv` / `.parquet` one row per run, and
`<stem>.html` the self-contained page with plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pandas as pd

from sweep.analysis import configs
from sweep.analysis.html import render_html
from sweep.analysis.sections import ReportData
from sweep.analysis.significance import load_items
from sweep.analysis.table import build_table, write_table


def report_tables(runs: Sequence, client, sweep_id: Optional[str] = None,
                  baseline=None) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run, one row per configuration). `baseline`: an fp16 run from outside `runs` to
    compare with (older sweeps, from before every sweep included its own)."""
    runs = list(runs)
    if baseline is not None and baseline.info.run_id not in {r.info.run_id for r in runs}:
        runs.append(baseline)
    per_run = build_table(runs, baseline, sweep_id)
    finished = per_run.loc[per_run["status"] == "FINISHED", "run_id"]
    items = {run_id: load_items(client, run_id) for run_id in finished} if client is not None else {}
    return per_run, configs.build_configurations(per_run, items)


def write_report(per_run: pd.DataFrame, per_config: pd.DataFrame, stem: Path, title: str, runs: Sequence = (),
                 client=None) -> List[Path]:
    """The configuration table (CSV, Markdown, Parquet), the run table (CSV, Parquet) and the HTML page."""
    paths = write_table(per_config, stem, markdown=configs.to_markdown(per_config))
    runs_stem = stem.with_name(stem.name + "-runs")
    per_run.to_csv(runs_stem.with_suffix(".csv"), index=False)
    per_run.to_parquet(runs_stem.with_suffix(".parquet"), index=False)
    page = stem.with_suffix(".html")
    page.write_text(render_html(ReportData(per_run, title, configs=per_config, runs=runs, client=client)))
    return paths + [runs_stem.with_suffix(".csv"), runs_stem.with_suffix(".parquet"), page]
