"""What a section of the HTML report is made from, and what it is: the types every section function shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pandas as pd


@dataclass
class ReportData:
    table: pd.DataFrame                  # one row per run: sweep.analysis.table.build_table's output
    title: str
    baseline: Optional[pd.Series] = None  # the fp16 row the deltas are against; default: the points' fp16 row
    runs: Sequence = ()                  # the MLflow runs behind the rows (for sections that read artifacts)
    client: Any = None                   # an MlflowClient on the same store
    configs: Optional[pd.DataFrame] = None  # one row per configuration (sweep.analysis.configs), if built

    @property
    def points(self) -> pd.DataFrame:
        """What the figures plot: one point per configuration (mean over seeds, with its interval) when
        the configuration table exists, else one per finished run."""
        if self.configs is not None:
            return self.configs[self.configs["runs"] > 0]
        return self.table[self.table["status"] == "FINISHED"]

    @property
    def baseline_point(self) -> Optional[pd.Series]:
        if self.baseline is not None:
            return self.baseline
        base = self.points[self.points["method"] == "fp16"]
        return base.iloc[0] if len(base) else None


@dataclass
class Section:
    title: str
    figure: Any = None                   # a matplotlib Figure, embedded as PNG
    caption: str = ""                    # HTML
    html: str = ""                       # extra HTML after the figure (a table ...)


SectionFn = Callable[[ReportData], Optional[Section]]
