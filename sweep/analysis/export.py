"""The report as files: the table (CSV and Parquet at full precision, Markdown rounded) and the HTML page."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import pandas as pd

from sweep.analysis.html import render_html
from sweep.analysis.sections import ReportData
from sweep.analysis.table import baseline_row, write_table


def write_report(df: pd.DataFrame, stem: Path, title: str, runs: Sequence = (), baseline=None,
                 client=None) -> List[Path]:
    """`<stem>.csv/.md/.parquet` plus the self-contained `<stem>.html` page with plots."""
    paths = write_table(df, stem)
    page = stem.with_suffix(".html")
    page.write_text(render_html(ReportData(df, title, baseline_row(df, baseline), runs, client)))
    return paths + [page]
