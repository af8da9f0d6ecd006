"""MLflow: the store, the experiment, the sweep's parent run and one child run per grid point.

Everything goes through `MlflowClient` with explicit run ids, never the fluent "active run":
grid points of one sweep may run in one process (Hydra's basic launcher) or in many
(joblib, SLURM), and each must log to its own run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional
from urllib.parse import urlparse

from sweep.config.schema import TrackingConfig
from sweep.tracking.store import open_client

DEFAULT_STORE = "outputs/mlflow.db"
DEFAULT_ARTIFACTS = "outputs/mlartifacts"
KNOWN_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")

# Tag keys, in one place.
TAG_SWEEP_ID = "sweep.id"
TAG_ROLE = "sweep.role"              # "sweep" (parent) or "point" (child)
TAG_CONFIG_HASH = "sweep.config_hash"
TAG_CONFIG_GROUP = "sweep.config_group"    # the config hash without seeds: runs of one configuration
TAG_BASELINE_HASH = "sweep.baseline_hash"  # config hash of the fp16 run this point is compared with
TAG_SEEDED = "sweep.seeded"                # "true" when the seed can change the result (calibrated methods)
TAG_PARENT = "mlflow.parentRunId"
TAG_REUSED_PREFIX = "sweep.reused."  # on a parent: config hash → id of the finished run it reused
TAG_NONFINITE = "status.nonfinite_metrics"  # metrics that came out NaN/inf (not logged as numbers)


def check_tracking_uri(uri: str) -> Optional[str]:
    """None if `uri` looks usable, else what is wrong with it."""
    parsed = urlparse(uri)
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme.split("+")[0] not in KNOWN_SCHEMES:
        return f"unknown scheme {parsed.scheme!r}; use one of {', '.join(KNOWN_SCHEMES)} or a local path"
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        return "a tracking server URI needs a host, e.g. http://127.0.0.1:5000"
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if not uri.startswith("sqlite:///") or not path:
            return "write sqlite URIs as sqlite:///relative/path.db or sqlite:////absolute/path.db"
        parent = Path(path).expanduser().resolve().parent
        if parent.exists() and not os.access(parent, os.W_OK):
            return f"{parent} is not writable"
    return None


def resolve_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path means relative to where the user launched, whatever the job's cwd.
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


def resolve_artifact_location(cfg: TrackingConfig, uri: str) -> Optional[str]:
    if cfg.artifact_location:
        loc = cfg.artifact_location
        return loc if "://" in loc else Path(loc).resolve().as_uri()
    if uri.startswith("sqlite:"):
        return Path(DEFAULT_ARTIFACTS).resolve().as_uri()
    return None  # a tracking server decides


class Tracker:
    def __init__(self, cfg: TrackingConfig, default_experiment: str):
        import mlflow  # noqa: F401 - installs its console handler when first imported; replaced just below

        # MLflow prints store migrations at INFO through its own console handler: route its
        # warnings to our logging setup instead.
        mlflow_log = logging.getLogger("mlflow")
        mlflow_log.handlers.clear()
        mlflow_log.propagate = True
        mlflow_log.setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = resolve_uri(cfg)
        self.experiment_name = cfg.experiment or default_experiment
        # Concurrent jobs may share one store: see sweep/tracking/store.py.
        self.client, self.experiment_id = open_client(
            self.uri, lambda client: self._experiment(client, resolve_artifact_location(cfg, self.uri)))

    def _experiment(self, client, artifact_location: Optional[str]) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment_name, artifact_location=artifact_location)
        except MlflowException:
            # Another job created it between our lookup and our create.
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs -------------------------------------------------------------------------
    def create_run(self, name: str, tags: Dict[str, str], parent_id: Optional[str] = None) -> str:
        tags = dict(tags)
        if parent_id:
            tags[TAG_PARENT] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def find_finished(self, config_hash: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    # --- logging ----------------------------------------------------------------------
    def log_params(self, run_id: str, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Dict[str, float]) -> List[str]:
        """Log the finite metrics; return the names of non-finite ones (never logged as numbers)."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        finite, bad = [], []
        for k, v in sorted(metrics.items()):
            if v is None or not math.isfinite(float(v)):
                bad.append(k)
            else:
                finite.append(Metric(k, float(v), now, 0))
        for i in range(0, len(finite), 1000):
            self.client.log_batch(run_id, metrics=finite[i:i + 1000])
        return bad

    def set_tags(self, run_id: str, tags: Dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_file(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def flatten(data: Dict[str, Any], prefix: str = "", whole: Iterable[str] = ()) -> Dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists, and dicts named in `whole`, stay whole (one param each)."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in whole:
            flat.update(flatten(value, name + ".", whole))
        else:
            flat[name] = value
    return flat


def latest_sweep(tracker: Tracker):
    """The newest sweep's parent run in the tracker's experiment, or None."""
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_sweep(tracker: Tracker, sweep_id: str):
    """A sweep's parent run by its run id or its `sweep.id` tag, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_run(sweep_id)
    except MlflowException:
        runs = tracker.client.search_runs(
            [tracker.experiment_id], filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'",
            max_results=1)
        return runs[0] if runs else None


def point_runs(tracker: Tracker) -> List:
    """Every grid point's run in the tracker's experiment, newest first."""
    return tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'point'",
                                      order_by=["attributes.start_time DESC"], max_results=5000)


def read_artifact(client, run_id: str, name: str) -> str:
    """The text of one artifact of a run (without MLflow's download progress bar)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, tmp)).read_text()


def sweep_runs(tracker: Tracker, parent_id: str) -> Iterable:
    """The child runs of a sweep plus the finished runs it reused instead of re-running."""
    children = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
                                          max_results=5000)
    parent = tracker.client.get_run(parent_id)
    reused = [v for k, v in parent.data.tags.items() if k.startswith(TAG_REUSED_PREFIX)]
    return latest_attempts(list(children) + [tracker.client.get_run(r) for r in reused])


def latest_attempts(runs: List) -> List:
    """One run per grid point (config hash): a finished one if any, else the newest. A relaunch that
    finishes a point killed or failed earlier in the same sweep supersedes that attempt (which
    stays in the store)."""
    def rank(run):
        return run.info.status == "FINISHED", run.info.start_time

    newest: Dict[str, Any] = {}
    for run in runs:
        key = run.data.tags.get(TAG_CONFIG_HASH, run.info.run_id)
        if key not in newest or rank(run) > rank(newest[key]):
            newest[key] = run
    return sorted(newest.values(), key=lambda r: r.info.start_time)
