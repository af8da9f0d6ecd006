"""Runs whose process died without closing them (SIGKILL, the OOM killer, a lost node).

A run's process can always be killed in a way it never hears about; its run then stays RUNNING
in the store forever. Every run records its host and process id (`owner_tags`); before a job
starts, runs of the same kind that are still RUNNING but whose process on this host is gone are
closed as KILLED (`close_orphans`), so the store says what really happened. A run owned by a
process on another host is left alone: from here we cannot tell whether it is still working.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Dict, List

import psutil

TAG_HOST = "sweep.host"
TAG_PID = "sweep.pid"


def owner_tags() -> Dict[str, Any]:
    return {TAG_HOST: socket.gethostname(), TAG_PID: os.getpid()}


def owner_gone(tags: Dict[str, str]) -> bool:
    """Whether the run with these tags was owned by a process on this host that has ended."""
    if tags.get(TAG_HOST) != socket.gethostname():
        return False
    try:
        pid = int(tags.get(TAG_PID, ""))
    except ValueError:
        return False
    return pid != os.getpid() and not psutil.pid_exists(pid)


def close_orphans(tracker, filter_string: str) -> List[str]:
    """Mark RUNNING runs matching `filter_string` whose owning process has ended as KILLED; return their ids."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"{filter_string} and attributes.status = 'RUNNING'",
                                      max_results=1000)
    closed = []
    for run in runs:
        if not owner_gone(run.data.tags):
            continue
        tracker.set_tags(run.info.run_id, {
            "error.class": "ProcessGone",
            "error.message": f"process {run.data.tags.get(TAG_PID)} on {run.data.tags.get(TAG_HOST)} ended "
                             "without closing this run (SIGKILL, out of memory, node lost); found on a later launch"})
        tracker.finish(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed
