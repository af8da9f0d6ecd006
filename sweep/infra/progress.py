"""What the user sees while a grid point runs: one line per phase with elapsed time, bars for long loops.

Library logs (transformers, lm-eval, mlflow ...) go to the job's log file, not here
(conf/hydra/job_logging/sweep.yaml; `library_logs_to` for work outside a Hydra job).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

from rich.console import Console
from rich.markup import escape
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
            # The label is text, not markup: "[baseline]" would otherwise vanish as an unknown style.
            self.console.print(f"[dim]{_fmt(elapsed)}[/dim] [bold]{escape(self.label)}[/bold] {message}")

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


@contextmanager
def library_logs_to(path: Path) -> Iterator[None]:
    """Inside the block, library logs (transformers, lm-eval, mlflow ...) go to `path`, not the terminal,
    as they do inside a Hydra job (conf/hydra/job_logging/sweep.yaml); for work the launching process
    does itself, such as a sweep's baseline run."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    errors = logging.StreamHandler()
    errors.setLevel(logging.ERROR)
    root.handlers = [handler, errors]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level = saved_handlers, saved_level
        handler.close()
