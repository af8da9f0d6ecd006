"""The MLflow UI for a sweep: a saved view that opens on it, and a local server to look at it.

`share_view` stores an MLflow "shared view" on the experiment (the UI's own Share feature: an
experiment tag `mlflow.sharedViewState.<key>`) that shows the sweep's parent and its children with
the main metrics as columns; the link it returns opens that view. `serve` starts `mlflow server`
on 127.0.0.1 for a store and stops it afterwards (used by the browser test and the screenshots).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

SHARED_VIEW_TAG = "mlflow.sharedViewState."
# Metrics shown as columns in the sweep's view, in this order (names: README, "Metric names").
VIEW_METRICS = ["wikitext.word_perplexity", "lambada.acc", "memory.packed_weights_mb", "latency.tokens_per_s",
                "time.quantize_s"]
VIEW_TAGS = ["weights", "bits", "group_size"]


def share_view(client, experiment_id: str, sweep_id: str) -> str:
    """Store the sweep's view on the experiment; return the UI path (after the host) that opens it."""
    key = f"sweep-{sweep_id}"
    state = {
        "searchFilter": f"tags.`sweep.id` = '{sweep_id}'",
        "selectedColumns": [f"metrics.`{m}`" for m in VIEW_METRICS] + [f"tags.`{t}`" for t in VIEW_TAGS],
    }
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"


def browse_hint(tracking_uri: str, view_path: str) -> str:
    """How to open a view: the link itself for a tracking server, else the `mlflow ui` command and the link."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/") + view_path
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then open http://127.0.0.1:5000{view_path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(backend_store_uri: str, port: Optional[int] = None, timeout: float = 120,
          log_file: Optional[Path] = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 for the store; yields its base URL, stops it on exit."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_file, "w") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering on {url}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer on {url} within {timeout:.0f}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_file:
            log.close()
