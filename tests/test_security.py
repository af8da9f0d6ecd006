"""Security defaults: no remote code unless asked, no pickle loads, no secrets in what is logged."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict

import pytest

from conftest import REPO, make_config
from sweep.infra.redact import public_config, public_overrides, redact_uri
from sweep.tracking.tracker import flatten


def test_remote_code_is_not_run_unless_the_config_says_so(tmp_path, embedded_model_dir):
    """A model directory whose config points at its own Python code: loading must refuse, not import it."""
    from sweep.models.loading import load_model

    model = tmp_path / "remote-code-model"
    shutil.copytree(embedded_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="sweep_remote_code_probe",
                  auto_map={"AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeModel"})
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (model / "probe.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    cfg = make_config("model=local", f"model.path={model}")
    assert cfg.model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(cfg.model, "cpu", cfg.cache_dir)
    assert not marker.exists()


def test_no_pickle_loads_in_the_package():
    """Weights come from safetensors, caches are safetensors/JSON: nothing in sweep/ unpickles a file."""
    pattern = re.compile(r"\b(pickle|dill|cloudpickle|joblib)\.loads?\(|torch\.load\(|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "sweep").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    assert "use_safetensors=True" in (REPO / "sweep" / "models" / "loading.py").read_text()


def test_secrets_never_reach_params_or_the_config_artifact():
    cfg = make_config("tracking.uri=postgresql://sweeper:hunter2@db.example:5432/mlflow",
                      "calibration.source=hub:org/data", "allow_hub=true")
    logged = public_config(asdict(cfg))
    params = flatten(logged)
    assert params["tracking.uri"] == "postgresql://sweeper:***@db.example:5432/mlflow"
    assert not any("hunter2" in str(v) for v in params.values())
    assert params["bench.max_new_tokens"] == cfg.bench.max_new_tokens  # "tokens" is not a secret
    nested = public_config({"method": {"name": "x", "hf_token": "hf_abc", "api_key": "k"}, "aws_secret_access_key": "s"})
    assert nested == {"method": {"name": "x"}}


def test_secrets_are_dropped_from_sweep_overrides():
    kept = public_overrides(["bits=2,3", "+hf_token=hf_abc", "tracking.uri=https://u:pw@host/x?token=t&a=1"])
    assert kept == ["bits=2,3", "tracking.uri=https://u:***@host/x?token=***&a=1"]
    assert redact_uri("sqlite:////abs/path.db") == "sqlite:////abs/path.db"
