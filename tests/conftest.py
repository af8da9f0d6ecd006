"""Shared fixtures. The embedded model is fetched and converted once per cache ($SWEEP_CACHE)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sweep.config import SweepConfig, register_configs, to_sweep_config

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
register_configs()


def make_config(*overrides: str) -> SweepConfig:
    """The validated SweepConfig that `python -m sweep <overrides>` would run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_sweep_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from sweep.models import embedded_model_dir as ensure

    return ensure("smollm2-135m-instruct", os.environ.get("SWEEP_CACHE", "~/.cache/sweep"))
