"""`python -m sweep [overrides] [-m]`: one grid point per Hydra job."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console

from sweep.config.schema import CONF_DIR, ConfigError, register_configs
from sweep.infra.gpu_pool import register_resolver
from sweep.infra.determinism import set_cublas_workspace
from sweep.infra.hardware import configure_threads
from sweep.infra.interrupts import sigterm_as_interrupt
from sweep.models.loading import resolve_device
from sweep.pipeline.objective import FAILED, describe, objective
from sweep.pipeline.run import preload_libraries, run_point
from sweep.pipeline.summary import print_point_summary
from sweep.pipeline.sweeps import is_grid, sweep_context
from sweep.validation.fields import to_sweep_config
from sweep.tracking.tracker import Tracker
from sweep.validation.model_fit import check_against_model

set_cublas_workspace()  # before anything starts CUDA: deterministic cuBLAS reductions (sweep/infra/determinism.py)
register_configs()
register_resolver()  # ${sweep_gpu_count:}, ${sweep_gpus_per_job:} in conf/hydra/launcher/


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float:
    """One grid point; returns its objective (sweep/pipeline/objective.py), which the Optuna sweeper minimises."""
    logging.captureWarnings(True)
    # Every job, in this process or a launcher's worker (joblib limits its workers to one thread each):
    # intra-op threads = physical cores, no tokenizer pool beside them. bfloat16 results on CPU depend on
    # the thread count, so it is fixed here, not left to the launcher (sweep/infra/hardware.py).
    configure_threads()
    # SIGTERM (a scheduler's kill, `kill PID`) ends a run like Ctrl-C: the run is marked KILLED.
    sigterm_as_interrupt()
    hc = HydraConfig.get()
    searching = hc.mode == RunMode.MULTIRUN and not is_grid(hc.sweeper)
    try:
        config = to_sweep_config(cfg)
        check_against_model(config)
    except ConfigError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        if searching:  # a search proposed an invalid point: score it as failed and let the search go on
            return FAILED
        sys.exit(2)
    preload_libraries([config])  # after validation: bad input still fails before any of it
    ctx = sweep_context()
    log_file = Path(hc.runtime.output_dir) / f"{hc.job.name}.log"
    result = run_point(config, ctx, log_file=log_file)
    if ctx is None and result.status == "FAILED":
        sys.exit(1)
    if ctx is None:  # a sweep ends with its table; a single run says what it measured
        print_point_summary(config, resolve_device(config.device), result.run_id, result.metrics,
                            Tracker(config.tracking, config.model.name))
    if searching:
        Console(stderr=True, highlight=False).print(describe(config.objective, result.status, result.metrics))
    return objective(config.objective, result.status, result.metrics)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt as exc:
        # Ctrl-C / SIGTERM: the open run is closed as KILLED with its traceback as an artifact (and a
        # sweep's parent run by its callback); the terminal gets one line, not a traceback.
        run_id = getattr(exc, "run_id", None)
        where = (f"run {run_id} marked KILLED (traceback: its artifact error/traceback.txt)" if run_id
                 else "no run was open")
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]interrupted[/yellow]: {where}")
        sys.exit(130)


if __name__ == "__main__":
    main()
