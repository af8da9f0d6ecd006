"""SIGTERM handled like Ctrl-C, so that a scheduler's kill unwinds the process and its open runs get closed."""
from __future__ import annotations

import signal


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's kill, `kill PID`) unwinds like Ctrl-C, so open runs get closed as KILLED."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
