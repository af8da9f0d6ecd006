"""The sweep-level progress line (points done, time per point, ETA)."""
from __future__ import annotations


def test_sweep_progress_line_gives_points_done_and_eta():
    import time

    from sweep.infra.progress import sweep_eta

    assert sweep_eta(time.time(), 0, 6) == "sweep: starting point 1 of 6"
    line = sweep_eta(time.time() - 600, 2, 6)  # 2 points took 10 min: 4 left, ~20 min
    assert "2/6 points done in 10:00" in line and "~05:00 per point" in line and "ETA 20:00" in line
    assert "ETA 1:40:00" in sweep_eta(time.time() - 1200, 1, 6)
