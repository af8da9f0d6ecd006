"""Validation that needs more than field ranges: model directories, data checksums, method capabilities
against the model's shapes, and a property test that every bad field is named."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONF, make_config
from sweep.config.schema import ConfigError
from sweep.validation.fields import validate
from sweep.validation.model_fit import check_against_model


def _model_dir(tmp_path, *files):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    for name in files:
        (d / name).write_bytes(b"x")
    return d


def test_model_dir_without_tokenizer_is_refused(tmp_path):
    d = _model_dir(tmp_path, "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.path=.* has no tokenizer: expected one of tokenizer.json"):
        make_config("model=local", f"model.path={d}")


def test_model_dir_with_only_pickled_weights_is_refused(tmp_path):
    d = _model_dir(tmp_path, "pytorch_model.bin", "tokenizer.json")
    with pytest.raises(ConfigError, match=r"only pickle-based weights \(pytorch_model.bin\)"):
        make_config("model=local", f"model.path={d}")


def test_complete_model_dir_passes(tmp_path):
    d = _model_dir(tmp_path, "model.safetensors", "tokenizer.json")
    assert make_config("model=local", f"model.path={d}").model.path == str(d)


@pytest.fixture
def fresh_data_checks():
    from sweep.data.vendored import data_file

    data_file.cache_clear()
    yield
    data_file.cache_clear()


def test_vendored_data_checksum_mismatch_is_refused(monkeypatch, fresh_data_checks):
    from sweep.data import vendored as datasets

    monkeypatch.setitem(datasets.CHECKSUMS, "lambada_openai.test.jsonl", "0" * 64)
    with pytest.raises(ConfigError) as err:
        make_config()
    assert "eval.tasks='lambada'" in str(err.value) and "expected 0000" in str(err.value)
    make_config("eval.tasks=[wikitext]")  # a config that does not read the file is fine


def test_calibration_file_checksum(tmp_path):
    src = tmp_path / "cal.txt"
    src.write_text("some calibration text\n" * 10)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    make_config(f"calibration.source={src}", f"calibration.sha256={digest}")
    with pytest.raises(ConfigError, match=f"calibration.sha256='{'1' * 64}'.*which is {digest}"):
        make_config(f"calibration.source={src}", f"calibration.sha256={'1' * 64}")


def test_bits_a_method_cannot_do(monkeypatch):
    from sweep.methods.rtn import RoundToNearest

    monkeypatch.setattr(RoundToNearest, "supported_bits", frozenset({2, 4, 8}))  # like a packed-kernel backend
    with pytest.raises(ConfigError, match="bits=3 is not allowed for method rtn: it supports 2, 4, 8"):
        make_config("method=rtn", "bits=3")
    make_config("method=rtn", "bits=4")


def test_group_size_checked_against_the_models_in_features(monkeypatch, embedded_model_dir):
    from sweep.methods.gptq import GPTQ

    # The torch backends take a ragged last group (576 = 4.5 x 128): allowed.
    check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "group_size=128"))
    monkeypatch.setattr(GPTQ, "ragged_groups", False)
    with pytest.raises(ConfigError) as err:
        check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "group_size=128"))
    msg = str(err.value)
    assert "group_size=128 does not divide in_features" in msg and "576 = hidden_size" in msg
    assert "allowed here are -1, 16, 32, 64" in msg
    for ok in ("64", "-1"):
        check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", f"group_size={ok}"))
    check_against_model(make_config("model=smollm2-135m-4l", "method=fp16", "group_size=128"))  # no groups


def test_multirun_refuses_a_group_size_the_model_rules_out(monkeypatch, embedded_model_dir):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sweep.methods.gptq import GPTQ
    from sweep.pipeline.sweeps import validate_grid

    monkeypatch.setattr(GPTQ, "ragged_groups", False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match="1 of 2 grid points are invalid"):
            validate_grid("config", [["model=smollm2-135m-4l", "group_size=64"],
                                     ["model=smollm2-135m-4l", "group_size=128"]])


@pytest.mark.parametrize("uri, problem", [
    ("http://", "needs a host"),
    ("sqlite:/relative.db", "sqlite:///"),
    ("gopher://x", "unknown scheme"),
])
def test_bad_tracking_uris(uri, problem):
    with pytest.raises(ConfigError, match=problem):
        make_config(f"tracking.uri={uri}")


_BASE = make_config()
# (field path, strategy, is it allowed?) for the numeric fields with documented ranges.
_FIELDS = {
    "bits": (st.integers(-2, 12), lambda v: 1 <= v <= 8),
    "group_size": (st.integers(-3, 300), lambda v: v == -1 or v >= 1),
    "damp_percent": (st.floats(-0.5, 1.5, allow_nan=False), lambda v: 0 < v <= 1),
    "calibration.nsamples": (st.integers(-2, 64), lambda v: v >= 1),
    "calibration.seqlen": (st.integers(0, 64), lambda v: v >= 8),
    "eval.limit.wikitext": (st.one_of(st.none(), st.integers(-2, 62)), lambda v: v is None or v >= 1),
    "eval.limit.lambada": (st.one_of(st.none(), st.integers(-2, 500)), lambda v: v is None or v >= 1),
    "eval.batch_size": (st.integers(-1, 16), lambda v: v >= 1),
}


def _set(cfg, path, value):
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    if isinstance(obj, dict):
        obj[leaf] = value
    else:
        setattr(obj, leaf, value)


@settings(max_examples=80, deadline=None)
@given(st.fixed_dictionaries({name: strat for name, (strat, _) in _FIELDS.items()}))
def test_validator_rejects_exactly_the_bad_fields_and_names_each(values):
    cfg = copy.deepcopy(_BASE)
    for name, value in values.items():
        _set(cfg, name, value)
    bad = [name for name, value in values.items() if not _FIELDS[name][1](value)]
    if not bad:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for name in bad:
        assert f"{name}={values[name]!r}" in str(err.value), (name, str(err.value))
