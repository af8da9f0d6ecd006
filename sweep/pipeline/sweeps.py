"""A Hydra multirun as one MLflow parent run.

`ParentRunCallback` (wired in conf/config.yaml under hydra.callbacks) runs in the launching
process: before any job it enumerates the grid, validates every point (so a typo fails in
milliseconds, not after hours of earlier points), creates the parent run and writes
`sweep.json` into the sweep directory. Jobs, in this process or others, read that file to
attach their child runs.

Every sweep includes the unquantized baseline of each model / evaluation / device it covers
(`baseline=true`, the default): a finished fp16 run with the same config hash is reused (the
parent records it), otherwise it runs once, in this process, before the grid. So the deltas and
`vs_fp16` of the summary are never empty in a normal sweep.

After the last job it closes the parent, logs the summary tables and makes the exit status
say how many points failed.
"""
from __future__ import annotations

import atexit
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from sweep.analysis.configs import summary_view
from sweep.analysis.export import report_tables, write_report
from sweep.analysis.table import find_baseline, print_table
from sweep.config.schema import ConfigError, SweepConfig
from sweep.infra.interrupts import sigterm_as_interrupt
from sweep.infra.progress import library_logs_to
from sweep.infra.redact import public_overrides, redact_uri
from sweep.methods import get_method
from sweep.models.loading import resolve_device
from sweep.pipeline import reuse
from sweep.pipeline.identity import baseline_config, config_hash
from sweep.pipeline.run import SweepContext, preload_libraries, run_point
from sweep.tracking.orphans import close_orphans, owner_tags
from sweep.tracking.tracker import TAG_NONFINITE, TAG_ROLE, TAG_SWEEP_ID, Tracker, sweep_runs
from sweep.tracking.ui import browse_hint, share_view
from sweep.validation.fields import to_sweep_config
from sweep.validation.model_fit import check_against_model

SWEEP_FILE = "sweep.json"
TAG_INTERRUPTED = "sweep.interrupted"  # on a parent: "true" once interrupted, "false" once a relaunch completed it
console = Console(stderr=True, highlight=False, soft_wrap=True)


def grid_overrides(cfg: DictConfig) -> List[List[str]]:
    """Every job's overrides, as Hydra's basic sweeper will expand them (command line + hydra.sweeper.params)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    arguments = list(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    if params:
        given = {a.split("=", 1)[0] for a in arguments}
        arguments += [f"{k}={v}" for k, v in params.items() if k not in given]
    parsed = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def is_grid(sweeper: DictConfig) -> bool:
    """True for Hydra's basic sweeper (a grid known up front); false for searches such as Optuna."""
    return str(sweeper.get("_target_", "")).endswith("BasicSweeper")


def validate_grid(config_name: str, jobs: List[List[str]]) -> List[SweepConfig]:
    """Every grid point's validated config; raises ConfigError naming every invalid point."""
    from hydra import compose

    problems, configs = [], []
    for overrides in jobs:
        try:
            cfg = to_sweep_config(compose(config_name=config_name, overrides=overrides))
            check_against_model(cfg)
            configs.append(cfg)
        except ConfigError as exc:
            problems.append(f"{' '.join(overrides) or '(defaults)'}:\n    {str(exc).replace(chr(10), chr(10) + '    ')}")
    if problems:
        raise ConfigError(f"{len(problems)} of {len(jobs)} grid points are invalid; nothing was run.\n" + "\n".join(problems))
    return configs


def missing_baselines(configs: Sequence[SweepConfig]) -> List[SweepConfig]:
    """The fp16 baseline of every point that asks for one (`baseline=true`) and whose baseline is not
    itself a point of the grid: one per distinct model / evaluation / benchmark / device."""
    in_grid, needed = set(), {}
    for cfg in configs:
        device = resolve_device(cfg.device)
        if cfg.method_name == "fp16":
            in_grid.add(config_hash(cfg, device))
        elif cfg.baseline and get_method(cfg.method_name).compared_with_baseline:
            base = baseline_config(cfg)
            needed.setdefault(config_hash(base, device), base)
    return [cfg for chash, cfg in needed.items() if chash not in in_grid]


class ParentRunCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Optional[Tracker] = None
        self.parent_id: Optional[str] = None
        self.started = 0.0
        self.closed = False

    # Hydra turns exceptions raised in callbacks into warnings and carries on; a sweep whose
    # parent run could not be set up must not start, so errors here exit instead.
    def on_multirun_start(self, config: DictConfig, config_name: str = "config", **kwargs: Any) -> None:
        try:
            self._start(config, config_name)
        except ConfigError as exc:
            console.print(f"[red]error:[/red] {exc}")
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001
            console.print(f"[red]error: could not start the sweep:[/red] {type(exc).__name__}: {exc}")
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        reuse.release()  # the last point's quantized model, kept in case another point measured it
        try:
            self.closed = True
            failed = self._end(config)
        except Exception as exc:  # noqa: BLE001
            console.print(f"[red]error: could not close the sweep's parent run:[/red] {type(exc).__name__}: {exc}")
            sys.exit(1)
        if failed:
            sys.exit(1)

    def _start(self, config: DictConfig, config_name: str) -> None:
        base = to_sweep_config(config)
        if is_grid(config.hydra.sweeper):
            jobs = grid_overrides(config)
            points = validate_grid(config_name, jobs)
            total = len(jobs)
        else:
            # A search (the Optuna sweeper) picks its points as it goes: each is validated when it runs.
            points = [base]
            total = int(OmegaConf.select(config, "hydra.sweeper.n_trials", default=0) or 0)
        # Before the baseline runs and holds its model (what exists at the freeze is never collected).
        preload_libraries(points)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state_file = sweep_dir / SWEEP_FILE
        self.tracker = Tracker(base.tracking, base.model.name)
        close_orphans(self.tracker, f"tags.`{TAG_ROLE}` = 'sweep'")
        if state_file.is_file():  # re-launch into the same sweep dir: keep its parent run
            state = json.loads(state_file.read_text())
            self.parent_id = state["parent_run_id"]
            self.tracker.client.update_run(self.parent_id, status="RUNNING")
        else:
            sweep_id = uuid.uuid4().hex[:12]
            overrides = public_overrides(list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False)))
            self.parent_id = self.tracker.create_run(
                f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
                {TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id, "sweep.dir": str(sweep_dir), "model": base.model.name,
                 **owner_tags()})
            self.tracker.log_params(self.parent_id, {"sweep.overrides": " ".join(overrides), "sweep.grid_size": total})
            state = {"sweep_id": sweep_id, "parent_run_id": self.parent_id}
        self.started = time.perf_counter()
        # Hydra skips on_multirun_end when the launcher is interrupted (Ctrl-C, SIGTERM): close the
        # parent run on the way out instead, so the store never keeps a dead sweep RUNNING.
        sigterm_as_interrupt()
        atexit.register(self._close_interrupted)
        console.print(f"[bold]sweep[/bold] {total} grid points → MLflow parent run {self.parent_id} "
                      f"(experiment {self.tracker.experiment_name!r}, {redact_uri(self.tracker.uri)})")
        for baseline in missing_baselines(points):
            log_file = sweep_dir / "baseline" / f"{config_hash(baseline, resolve_device(baseline.device))}.log"
            with library_logs_to(log_file):
                run_point(baseline, SweepContext(state["sweep_id"], self.parent_id, index=0, total=total,
                                                 role="baseline"), log_file=log_file)
        state.update(total=total, tracking_uri=redact_uri(self.tracker.uri), experiment=self.tracker.experiment_name,
                     started=time.time())
        state_file.write_text(json.dumps(state, indent=2))

    def _close_interrupted(self) -> None:
        if self.closed or self.tracker is None or self.parent_id is None:
            return
        self.closed = True
        try:
            self.tracker.set_tags(self.parent_id, {TAG_INTERRUPTED: "true"})
            self.tracker.finish(self.parent_id, "KILLED")
            console.print(f"[yellow]sweep interrupted[/yellow]: parent run {self.parent_id} marked KILLED; "
                          "re-launch the same command to run what is missing (finished points are skipped)")
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the store may lag
            console.print(f"[red]could not mark the parent run KILLED:[/red] {type(exc).__name__}: {exc}")

    def _end(self, config: DictConfig) -> int:
        if self.tracker is None or self.parent_id is None:
            return 0
        runs = sweep_runs(self.tracker, self.parent_id)
        failed = [r for r in runs if r.info.status != "FINISHED"]
        out_dir = Path(str(config.hydra.sweep.dir))
        sweep_id = self.tracker.client.get_run(self.parent_id).data.tags.get(TAG_SWEEP_ID)
        per_run, per_config = report_tables(runs, self.tracker.client, sweep_id, find_baseline(self.tracker, runs))
        title = f"sweep {sweep_id}: {len(per_config)} configurations, {len(runs)} runs"
        paths = write_report(per_run, per_config, out_dir / "summary", title, runs, self.tracker.client)
        for path in paths:
            self.tracker.log_file(self.parent_id, path, "summary")
        self.tracker.log_metrics(self.parent_id, {"sweep.points": len(runs), "sweep.failed": len(failed),
                                                  "sweep.wall_s": time.perf_counter() - self.started})
        if TAG_INTERRUPTED in self.tracker.client.get_run(self.parent_id).data.tags:
            self.tracker.set_tags(self.parent_id, {TAG_INTERRUPTED: "false"})
        self.tracker.finish(self.parent_id, "FAILED" if failed else "FINISHED")
        print_table(summary_view(per_config), title)
        console.print(f"[bold]sweep done[/bold]: {len(runs) - len(failed)} finished, {len(failed)} failed; "
                      f"summary in {out_dir / 'summary.md'} and summary.html; `python -m sweep.report` rebuilds it")
        console.print(f"  MLflow UI: {browse_hint(self.tracker.uri, share_view(self.tracker.client, self.tracker.experiment_id, sweep_id))}")
        for run in failed:
            console.print(f"  [red]{run.info.status}[/red] {run.info.run_name}: "
                          f"{run.data.tags.get('error.class', '')} {run.data.tags.get('error.message', '')[:200]}")
        for run in runs:
            if run.data.tags.get(TAG_NONFINITE):
                console.print(f"  [yellow]non-finite metrics[/yellow] {run.info.run_name}: {run.data.tags[TAG_NONFINITE]}")
        return len(failed)


def sweep_context() -> Optional[SweepContext]:
    """This job's place in its sweep, or None for a single run."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    state_file = Path(hc.sweep.dir).resolve() / SWEEP_FILE
    if not state_file.is_file():
        # Only if the launching process's callback did not run, or the job cannot see its sweep
        # directory (SLURM: put hydra.sweep.dir on a filesystem the nodes share).
        console.print(f"[yellow]warning:[/yellow] {state_file} not found; this grid point is logged as a "
                      "run of its own, outside its sweep's parent run")
        return None
    state: Dict[str, Any] = json.loads(state_file.read_text())
    return SweepContext(sweep_id=state["sweep_id"], parent_run_id=state["parent_run_id"],
                        index=int(hc.job.num), total=int(state["total"]), started=state.get("started"))
