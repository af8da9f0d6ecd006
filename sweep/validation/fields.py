"""Every field of a grid point's config checked before anything loads: types, ranges, method capabilities.

`to_sweep_config` turns Hydra's composed config into the schema's dataclasses (OmegaConf
type-checks every field on the way), then `validate` checks what can be checked without a model
and reports all problems at once, each naming the field, the value and what is allowed. A bad
grid point costs milliseconds, not a model load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sweep.config.schema import (BENCH_MODES, BITS_RANGE, CALIBRATION_DEFAULTS, CALIBRATION_SOURCES, DEVICES,
                                 DTYPES, EVAL_TASKS, MODEL_INITS, ConfigError, SweepConfig)
from sweep.data.tasks import DATA_FILES
from sweep.data.vendored import DataIntegrityError, data_file, evaluation_checksums
from sweep.infra.cache import sha256_file
from sweep.infra.redact import redact_uri
from sweep.methods import available_methods, get_method
from sweep.models.checks import model_dir_errors
from sweep.models.embedded import EMBEDDED_MODELS
from sweep.tracking.tracker import check_tracking_uri
from sweep.validation.model_fit import layer_bits_target_errors


def to_sweep_config(cfg: DictConfig) -> SweepConfig:
    """Hydra's composed config → validated SweepConfig (raises ConfigError)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), _without_hydra(cfg))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    assert isinstance(obj, SweepConfig)
    validate(obj)
    return obj


def _resolve_calibration_size(cfg: SweepConfig) -> None:
    """calibration.nsamples / seqlen left null take the device's default (CALIBRATION_DEFAULTS)."""
    cal = cfg.calibration
    if cal.nsamples is not None and cal.seqlen is not None:
        return
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    nsamples, seqlen = CALIBRATION_DEFAULTS.get(device, CALIBRATION_DEFAULTS["cpu"])
    cal.nsamples = nsamples if cal.nsamples is None else cal.nsamples
    cal.seqlen = seqlen if cal.seqlen is None else cal.seqlen


def _without_hydra(cfg: DictConfig) -> DictConfig:
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def validate(cfg: SweepConfig) -> None:
    """Check every field that can be checked without a model; report all problems at once.
    (Fields left to a device default, calibration.nsamples/seqlen, are resolved first.)"""
    _resolve_calibration_size(cfg)
    errors: List[str] = []

    def bad(field_name: str, value: Any, allowed: str) -> None:
        errors.append(f"{field_name}={value!r} is not allowed: {allowed}")

    name = cfg.method.get("name") if isinstance(cfg.method, dict) else None
    if name not in available_methods():
        bad("method", name, f"available methods are {', '.join(available_methods())}")
    if cfg.bits not in BITS_RANGE:
        bad("bits", cfg.bits, "an integer from 1 to 8")
    if cfg.group_size != -1 and cfg.group_size < 1:
        bad("group_size", cfg.group_size, "-1 (one group per output channel) or a positive group size such as 32, 64, 128")
    if not (0.0 < cfg.damp_percent <= 1.0):
        bad("damp_percent", cfg.damp_percent, "a fraction in (0, 1], e.g. 0.01")
    if cfg.device not in DEVICES:
        bad("device", cfg.device, f"one of {', '.join(DEVICES)}")
    if cfg.model.dtype not in DTYPES:
        bad("model.dtype", cfg.model.dtype, f"one of {', '.join(DTYPES)}")
    if cfg.model.num_layers is not None and cfg.model.num_layers < 1:
        bad("model.num_layers", cfg.model.num_layers, "null or a positive number of decoder layers")
    if cfg.model.init not in MODEL_INITS:
        bad("model.init", cfg.model.init, f"one of {', '.join(MODEL_INITS)}")
    elif cfg.model.init == "random":
        arch = cfg.model.architecture or {}
        if "model_type" not in arch:
            bad("model.architecture", cfg.model.architecture,
                "a mapping of Hugging Face config fields including model_type (e.g. llama) when model.init=random")
    if cfg.bench.batch_size < 1:
        bad("bench.batch_size", cfg.bench.batch_size, "at least 1")
    if cfg.bench.mode not in BENCH_MODES:
        bad("bench.mode", cfg.bench.mode, f"one of {', '.join(BENCH_MODES)}")
    if cfg.model.path.startswith("embedded:"):
        model_id = cfg.model.path.split(":", 1)[1]
        if model_id not in EMBEDDED_MODELS:
            bad("model.path", cfg.model.path, f"embedded models are {', '.join('embedded:' + k for k in EMBEDDED_MODELS)}")
    elif Path(os.path.expanduser(cfg.model.path)).is_dir():
        errors.extend(model_dir_errors(Path(os.path.expanduser(cfg.model.path)),
                                       tokenizer_only=cfg.model.init == "random"))
    elif not cfg.allow_hub:
        bad("model.path", cfg.model.path,
            "not a local directory, and Hub downloads are off: give a local model directory, "
            "an embedded model (embedded:smollm2-135m-instruct), or set allow_hub=true")
    _validate_calibration(cfg, bad)
    _validate_vendored_data(cfg, bad)
    for task in cfg.eval.tasks:
        if task not in EVAL_TASKS:
            bad("eval.tasks", task, f"tasks are {', '.join(EVAL_TASKS)}")
    for task, limit in cfg.eval.limit.items():
        if task not in EVAL_TASKS:
            bad(f"eval.limit.{task}", limit, f"limits are keyed by task: {', '.join(EVAL_TASKS)}")
        elif limit is not None and limit < 1:
            bad(f"eval.limit.{task}", limit, "null (whole test set) or at least 1")
    if cfg.eval.dtype not in DTYPES:
        bad("eval.dtype", cfg.eval.dtype, f"one of {', '.join(DTYPES)}")
    if cfg.eval.batch_size < 1:
        bad("eval.batch_size", cfg.eval.batch_size, "at least 1")
    if cfg.eval.max_length is not None and cfg.eval.max_length < 16:
        bad("eval.max_length", cfg.eval.max_length, "null (the model's maximum) or at least 16")
    if cfg.bench.max_new_tokens < 2:
        bad("bench.max_new_tokens", cfg.bench.max_new_tokens, "at least 2 (inter-token latency needs two tokens)")
    if cfg.bench.repeats < 0 or cfg.bench.warmup < 0:
        bad("bench.repeats/bench.warmup", (cfg.bench.repeats, cfg.bench.warmup), "zero (skip latency) or more")
    if cfg.bench.repeats > 0 and not cfg.bench.prompts:
        bad("bench.prompts", cfg.bench.prompts, "at least one prompt when bench.repeats > 0")
    if cfg.tracking.uri is not None:
        problem = check_tracking_uri(cfg.tracking.uri)
        if problem:
            bad("tracking.uri", redact_uri(cfg.tracking.uri), problem)
    if cfg.objective.memory_budget_mb is not None and cfg.objective.memory_budget_mb <= 0:
        bad("objective.memory_budget_mb", cfg.objective.memory_budget_mb, "null (no budget) or a positive size in MB")
    if name in available_methods():
        errors.extend(get_method(name).config_errors(cfg))
        errors.extend(layer_bits_target_errors(cfg))
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _validate_calibration(cfg: SweepConfig, bad) -> None:
    cal = cfg.calibration
    if cal.nsamples < 1:
        bad("calibration.nsamples", cal.nsamples, "at least 1")
    if cal.seqlen < 8:
        bad("calibration.seqlen", cal.seqlen, "at least 8 tokens")
    gen = cal.generation
    if gen.temperature <= 0:
        bad("calibration.generation.temperature", gen.temperature, "greater than 0 (1.0 samples the model as it is)")
    if not 0 < gen.top_p <= 1:
        bad("calibration.generation.top_p", gen.top_p, "a fraction in (0, 1]")
    if gen.batch_size < 1:
        bad("calibration.generation.batch_size", gen.batch_size, "at least 1")
    if not gen.openings and gen.chat_prompt is None:
        bad("calibration.generation.openings", gen.openings, "at least one start: \"\" (BOS) or an opening text")
    src = cal.source
    if src in CALIBRATION_SOURCES or src.startswith("hub:"):
        if src.startswith("hub:") and not cfg.allow_hub:
            bad("calibration.source", src, "Hub datasets need allow_hub=true")
        return
    path = Path(os.path.expanduser(src))
    if not path.is_file():
        bad("calibration.source", src, f"one of {', '.join(CALIBRATION_SOURCES)}, an existing .txt/.jsonl file, "
                                       "or hub:<dataset>")
        return
    digest = sha256_file(path)
    if digest in evaluation_checksums():
        bad("calibration.source", src, f"it is {evaluation_checksums()[digest]}, which sweep evaluates on: "
                                       "calibrating on the test set would score the model on what it was fitted to")
        return
    if path.suffix not in (".txt", ".jsonl", ".json"):
        bad("calibration.source", src, "a .txt (plain text) or .jsonl file")
        return
    if cal.sha256 is not None and digest != cal.sha256.lower():
        bad("calibration.sha256", cal.sha256, f"the sha256 of {src}, which is {digest} (the file changed?)")


def _validate_vendored_data(cfg: SweepConfig, bad) -> None:
    """The vendored files this config reads must match their recorded sha256."""
    needed = [("eval.tasks", task, DATA_FILES[task]) for task in cfg.eval.tasks if task in DATA_FILES]
    if cfg.calibration.source == "lambada_dev":
        needed.append(("calibration.source", "lambada_dev", "lambada.development.plain.txt"))
    for field_name, value, file_name in needed:
        try:
            data_file(file_name)
        except DataIntegrityError as exc:
            bad(field_name, value, f"its data file fails its check ({exc}); reinstall sweep")
