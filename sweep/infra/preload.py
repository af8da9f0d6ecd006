"""Import the libraries a run uses once, before its first phase, with Python's cyclic garbage collector paused.

A run imported transformers' model code (inside the tokenizer's load), MLflow and lm-eval lazily: about 4 s
of imports during which the heap grows by about a million objects and the collector walks all of it again
and again (2.5-2.6 s of the default point's 2.8 s in the collector, counted with `gc.callbacks`). Here the
same imports run with the collector paused; then one collection frees what they left behind, and
`gc.freeze()` moves what survives (modules, classes and functions, which live as long as the process) out
of every later collection, so each later `gc.collect()` (sweep runs one to free a grid point's model) walks
only what the run itself created. The libraries' imports also no longer count in the `load` phase's time.

Only the first call in a process freezes: later ones, in a sweep's later jobs, run while the previous
point's objects exist, and anything frozen would never be collected.
"""
from __future__ import annotations

import gc
import importlib
from typing import Iterable

_frozen = False


def preload(modules: Iterable[str]) -> None:
    """Import `modules` with the collector paused, then collect once and freeze what remains; only the first
    call in a process does anything."""
    global _frozen
    if _frozen:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # the phase that needs it fails in its own run, which records why
    finally:
        if was_enabled:
            gc.enable()
    gc.collect()
    gc.freeze()
    _frozen = True
