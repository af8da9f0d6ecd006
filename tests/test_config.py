"""Config validation: bad input fails early, naming the field, the value and what is allowed."""
from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
from hydra.errors import HydraException
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, make_config
from sweep.config.schema import ConfigError
from sweep.pipeline.identity import config_hash
from sweep.validation.fields import validate


def test_defaults_are_valid():
    cfg = make_config()
    assert cfg.method_name == "gptq" and cfg.bits == 4 and cfg.model.path.startswith("embedded:")


@pytest.mark.parametrize("override, field, allowed", [
    ("bits=9", "bits=9", "from 1 to 8"),
    ("bits=0", "bits=0", "from 1 to 8"),
    ("group_size=0", "group_size=0", "-1"),
    ("group_size=-2", "group_size=-2", "-1"),
    ("damp_percent=0", "damp_percent=0", "(0, 1]"),
    ("damp_percent=1.5", "damp_percent=1.5", "(0, 1]"),
    ("eval.limit.wikitext=0", "eval.limit.wikitext=0", "at least 1"),
    ("calibration.source=/no/such/file.txt", "calibration.source", ".jsonl"),
    ("model.path=/no/such/model", "model.path", "allow_hub=true"),
    ("device=tpu", "device='tpu'", "auto, cpu, cuda"),
    ("tracking.uri=ftp://x", "tracking.uri", "unknown scheme"),
    ("method.backend=nope", "method.backend='nope'", "torch"),
    ("+method.unknown_option=1", "unknown_option", "method"),
])
def test_bad_values_name_field_and_allowed_values(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        make_config(override)
    assert field in str(err.value) and allowed in str(err.value)


def test_wrong_type_names_the_field():
    # The typed schema makes Hydra itself refuse the override while composing.
    with pytest.raises(HydraException, match="bits=four"):
        make_config("bits=four")


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        make_config("bits=12", "damp_percent=2")
    assert "bits=12" in str(err.value) and "damp_percent=2" in str(err.value)


def test_unknown_method_lists_available_ones():
    with pytest.raises(HydraException) as err:
        make_config("method=awq4")
    for name in ("fp16", "gptq", "rtn"):
        assert name in str(err.value)


def test_hash_ignores_knobs_the_method_does_not_use():
    assert config_hash(make_config("method=fp16", "bits=2")) == config_hash(make_config("method=fp16", "bits=8"))
    assert config_hash(make_config("method=rtn", "bits=2")) != config_hash(make_config("method=rtn", "bits=8"))
    # RTN takes no calibration and no damping: they do not split its results.
    assert config_hash(make_config("method=rtn", "damp_percent=0.1")) == config_hash(make_config("method=rtn"))
    assert config_hash(make_config("method=gptq", "damp_percent=0.1")) != config_hash(make_config("method=gptq"))
    assert config_hash(make_config("method=rtn", "resume=false")) == config_hash(make_config("method=rtn"))


_BASE = make_config()


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(-3, 12), group_size=st.integers(-3, 300), damp=st.floats(-0.5, 1.5, allow_nan=False))
def test_validator_accepts_exactly_the_documented_ranges(bits, group_size, damp):
    cfg = copy.deepcopy(_BASE)
    cfg.bits, cfg.group_size, cfg.damp_percent = bits, group_size, damp
    ok = 1 <= bits <= 8 and (group_size == -1 or group_size >= 1) and 0 < damp <= 1
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError):
            validate(cfg)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_rejects_bad_value_before_loading_a_model(tmp_path):
    start = time.perf_counter()
    proc = _cli("bits=9", f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "bits=9" in proc.stderr and "from 1 to 8" in proc.stderr
    assert "load ..." not in proc.stderr  # no phase started


def test_cli_multirun_with_one_bad_point_runs_nothing(tmp_path):
    db = tmp_path / "m.db"
    proc = _cli("model=smollm2-135m-4l", "method=rtn", "bits=4,9", f"tracking.uri=sqlite:///{db}",
                f"hydra.sweep.dir={tmp_path}/sweep", "-m")
    assert proc.returncode == 2, proc.stderr
    assert "1 of 2 grid points are invalid" in proc.stderr and "bits=9" in proc.stderr
    assert "Launching" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("preset, size", [("bits_vs_group", 16), ("damp_sweep", 4), ("methods_at_4bit", 3)])
def test_experiment_presets_expand_to_valid_grids(preset, size):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF
    from sweep.pipeline.sweeps import grid_overrides, validate_grid

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
        jobs = grid_overrides(cfg)
        assert len(jobs) == size
        validate_grid("config", jobs)

