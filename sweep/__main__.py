"""`python -m sweep [overrides] [-m]`: one grid point per Hydra job."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from sweep.config import ConfigError, register_configs, to_sweep_config
from sweep.model_checks import check_against_model
from sweep.orphans import sigterm_as_interrupt

register_configs()


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> str:
    from sweep.run import run_point
    from sweep.sweeps import sweep_context

    logging.captureWarnings(True)
    # SIGTERM (a scheduler's kill, `kill PID`) ends a run like Ctrl-C: the run is marked KILLED.
    sigterm_as_interrupt()
    try:
        config = to_sweep_config(cfg)
        check_against_model(config)
    except ConfigError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    ctx = sweep_context()
    hc = HydraConfig.get()
    log_file = Path(hc.runtime.output_dir) / f"{hc.job.name}.log"
    result = run_point(config, ctx, log_file=log_file)
    if ctx is None and result.status == "FAILED":
        sys.exit(1)
    return result.status


def main() -> None:
    app()


if __name__ == "__main__":
    main()
