"""What a section of the HTML report is made from, and what it is: the types every section function shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pandas as pd


@dataclass
class ReportData:
    table: pd.DataFrame                  # build_table's output, COLUMNS order
    title: str
    baseline: Optional[pd.Series] = None  # the fp16 row the deltas are against, if any
    runs: Sequence = ()                  # the MLflow runs behind the rows (for sections that read artifacts)
    client: Any = None                   # an MlflowClient on the same store


@dataclass
class Section:
    title: str
    figure: Any = None                   # a matplotlib Figure, embedded as PNG
    caption: str = ""                    # HTML
    html: str = ""                       # extra HTML after the figure (a table ...)


SectionFn = Callable[[ReportData], Optional[Section]]
