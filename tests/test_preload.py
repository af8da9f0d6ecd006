"""sweep/infra/preload.py: the libraries imported with the collector paused and frozen once, and everything a
run creates afterwards still collected (a sweep's later points free their models with gc.collect())."""
from __future__ import annotations

import subprocess
import sys

# In a fresh interpreter: freezing inside pytest's process would keep its objects from every collection.
SCRIPT = r"""
import gc, sys, weakref
from sweep.infra.preload import preload

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

before = cycle()                        # exists when preload freezes: never collected
preload(["json", "no_such_module_here", "csv"])
assert "json" in sys.modules and "csv" in sys.modules, "modules not imported"
assert gc.isenabled(), "collector left paused"
frozen = gc.get_freeze_count()
assert frozen > 0, "nothing frozen"

made_after = cycle()                    # a later grid point's model, in a reference cycle
kept = cycle()                          # exists when a later job calls preload again
preload(["decimal"])                    # a later job: must neither import nor freeze
assert gc.get_freeze_count() == frozen and "decimal" not in sys.modules, "a second call froze or imported"

refs = {"before": weakref.ref(before), "made after": weakref.ref(made_after), "kept": weakref.ref(kept)}
del before, made_after, kept
gc.collect()
alive = sorted(name for name, ref in refs.items() if ref() is not None)
assert alive == ["before"], alive
print("ok")
"""


def test_preload_freezes_once_and_what_comes_after_is_still_collected():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
