"""What the user sees while a grid point runs: one line per phase with elapsed time, bars for long loops.

Library logs (transformers, lm-eval, mlflow ...) go to the job's log file, not here (sweep/logs.py).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

from rich.console import Console
from tqdm.auto import tqdm

T = TypeVar("T")


class Progress:
    def __init__(self, label: str = "", console: Optional[Console] = None, enabled: bool = True):
        self.label = label              # e.g. "[3/6] gptq bits=3 group_size=128"
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.enabled = enabled
        self.started = time.perf_counter()
        self.phase_seconds: dict = {}

    def say(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"[dim]{_fmt(elapsed)}[/dim] [bold]{self.label}[/bold] {message}")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = time.perf_counter() - t0
            self.say(f"{name} done in {_fmt(self.phase_seconds[name])}")

    def track(self, items: Iterable[T], description: str, total: Optional[int] = None) -> Iterator[T]:
        return iter(tqdm(items, desc=f"  {description}", total=total, disable=not self.enabled,
                         leave=False, dynamic_ncols=True, mininterval=1.0))


def sweep_eta(started: float, index: int, total: int) -> str:
    """Where the sweep stands before grid point `index` (0-based) starts, with a naive ETA.

    The ETA assumes points run one after another (Hydra's basic launcher) and take about the same time.
    """
    elapsed = time.time() - started
    if index == 0:
        return f"sweep: starting point 1 of {total}"
    per_point = elapsed / index
    return (f"sweep: {index}/{total} points done in {_fmt(elapsed)}, ~{_fmt(per_point)} per point, "
            f"ETA {_fmt(per_point * (total - index))}")


def _fmt(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
