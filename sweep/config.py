"""The config schema of one grid point, and its validation.

Hydra composes `conf/`; `to_sweep_config` turns that into these dataclasses (OmegaConf
type-checks every field on the way) and `validate` checks ranges and method capabilities.
Both run before any model is loaded, so a bad grid point costs milliseconds, not a model load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

BITS_RANGE = range(1, 9)
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EVAL_TASKS = ("wikitext", "lambada")
MODEL_INITS = ("pretrained", "random")
BENCH_MODES = ("eager", "static", "graph", "both", "all")


class ConfigError(ValueError):
    """A config value that cannot work. The message names the field, the value and what is allowed."""


@dataclass
class ModelConfig:
    # Display name; also the default MLflow experiment.
    name: str = "smollm2-135m"
    # "embedded:<id>" (shipped through PyPI, see sweep/models.py), a local directory, or a Hub id.
    path: str = "embedded:smollm2-135m-instruct"
    dtype: str = "auto"
    # Keep only the first N decoder layers (a cheap, honest stand-in model for fast tests).
    num_layers: Optional[int] = None
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # "pretrained" loads weights from `path`; "random" builds `architecture` with random weights
    # (real sizes for memory/latency on machines without model files; its quality is meaningless).
    init: str = "pretrained"
    # With init=random, `path` supplies only the tokenizer.
    # Hugging Face config fields for init=random, including model_type (e.g. llama, qwen2).
    architecture: Optional[Dict[str, Any]] = None


@dataclass
class CalibrationConfig:
    # "lambada_dev" (vendored LAMBADA development split), a local .txt/.jsonl file, or "hub:<dataset>[:<config>]".
    source: str = "lambada_dev"
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    # Field read from .jsonl files and Hub datasets.
    text_field: str = "text"
    # Expected sha256 of a local source file: checked before anything runs (and part of the config hash).
    sha256: Optional[str] = None


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=lambda: list(EVAL_TASKS))
    # Documents (wikitext) or examples (lambada) per task; null evaluates the whole test set.
    limit: Dict[str, Optional[int]] = field(default_factory=lambda: {"wikitext": 2, "lambada": 200})
    batch_size: int = 8
    # Context window for rolling perplexity; the model's own maximum when null.
    max_length: Optional[int] = 2048
    # lm-eval's bootstrap for perplexity standard errors (0 = skip; it is slow on CPU).
    bootstrap_iters: int = 0


@dataclass
class BenchConfig:
    # One sample generation per prompt is kept as an artifact.
    prompts: List[str] = field(default_factory=lambda: ["Explain what quantization does to a neural network."])
    max_new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    chat_template: bool = True
    # Save the model once to a temporary directory to measure its size on disk.
    disk_size: bool = True
    # Prompts per generate() call (the prompt list is repeated to fill the batch).
    batch_size: int = 1
    # "eager": generate() as users call it. "static": static KV cache + torch.compile/CUDA graphs,
    # which removes the Python/launch overhead that makes eager decode host-bound on fast GPUs.
    # "graph": the decode loop of a serving engine (compiled step replayed as a CUDA graph, the next
    # token chosen on the device, no host sync per step): what the weights and kernels cost.
    # "both" = eager + static (metrics latency.* and latency.static.*); "all" adds graph (latency.graph.*).
    mode: str = "eager"


@dataclass
class TrackingConfig:
    # MLflow tracking URI; null means $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db.
    uri: Optional[str] = None
    # Experiment name; null means the model's name.
    experiment: Optional[str] = None
    # Where artifacts of new experiments go (a local path or URI); null means outputs/mlartifacts.
    artifact_location: Optional[str] = None


@dataclass
class ObjectiveConfig:
    """What a search (the Optuna sweeper preset) minimises; plain grids ignore it (sweep/objective.py)."""

    metric: str = "wikitext.word_perplexity"
    # Points whose `memory_metric` exceeds this many MB are penalised; null = no budget.
    memory_budget_mb: Optional[float] = None
    memory_metric: str = "memory.packed_weights_mb"


@dataclass
class SweepConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # Method options differ per method: each method validates its own (sweep/methods/*.py).
    method: Any = field(default_factory=lambda: {"name": "rtn"})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # The quantization knobs are top level so that grids read `bits=2,3,4 group_size=32,128`.
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    damp_percent: float = 0.01
    desc_act: bool = False
    quantize_lm_head: bool = False
    device: str = "auto"
    seed: int = 0
    cache_dir: str = "~/.cache/sweep"
    # Hub downloads are off unless asked for: every default runs offline.
    allow_hub: bool = False
    # Skip grid points whose finished run is already in the store; force re-runs them.
    resume: bool = True
    force: bool = False

    @property
    def method_name(self) -> str:
        return str(self.method["name"])


def register_configs() -> None:
    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


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


def _without_hydra(cfg: DictConfig) -> DictConfig:
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def validate(cfg: SweepConfig) -> None:
    """Check every field that can be checked without a model; report all problems at once."""
    from sweep.methods import available_methods, get_method

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
        from sweep.models import EMBEDDED_MODELS

        model_id = cfg.model.path.split(":", 1)[1]
        if model_id not in EMBEDDED_MODELS:
            bad("model.path", cfg.model.path, f"embedded models are {', '.join('embedded:' + k for k in EMBEDDED_MODELS)}")
    elif Path(os.path.expanduser(cfg.model.path)).is_dir():
        from sweep.model_checks import model_dir_errors

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
        from sweep.redact import redact_uri
        from sweep.tracking import check_tracking_uri

        problem = check_tracking_uri(cfg.tracking.uri)
        if problem:
            bad("tracking.uri", redact_uri(cfg.tracking.uri), problem)
    if cfg.objective.memory_budget_mb is not None and cfg.objective.memory_budget_mb <= 0:
        bad("objective.memory_budget_mb", cfg.objective.memory_budget_mb, "null (no budget) or a positive size in MB")
    if name in available_methods():
        errors.extend(get_method(name).config_errors(cfg))
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _validate_calibration(cfg: SweepConfig, bad) -> None:
    cal = cfg.calibration
    if cal.nsamples < 1:
        bad("calibration.nsamples", cal.nsamples, "at least 1")
    if cal.seqlen < 8:
        bad("calibration.seqlen", cal.seqlen, "at least 8 tokens")
    src = cal.source
    if src == "lambada_dev" or src.startswith("hub:"):
        if src.startswith("hub:") and not cfg.allow_hub:
            bad("calibration.source", src, "Hub datasets need allow_hub=true")
        return
    path = Path(os.path.expanduser(src))
    if not path.is_file():
        bad("calibration.source", src, "'lambada_dev', an existing .txt/.jsonl file, or hub:<dataset>")
    elif path.suffix not in (".txt", ".jsonl", ".json"):
        bad("calibration.source", src, "a .txt (plain text) or .jsonl file")
    elif cal.sha256 is not None:
        from sweep.cache import sha256_file

        digest = sha256_file(path)
        if digest != cal.sha256.lower():
            bad("calibration.sha256", cal.sha256, f"the sha256 of {src}, which is {digest} (the file changed?)")


def _validate_vendored_data(cfg: SweepConfig, bad) -> None:
    """The vendored files this config reads must match their recorded sha256."""
    from sweep.datasets import DataIntegrityError, data_file
    from sweep.tasks import DATA_FILES

    needed = [("eval.tasks", task, DATA_FILES[task]) for task in cfg.eval.tasks if task in DATA_FILES]
    if cfg.calibration.source == "lambada_dev":
        needed.append(("calibration.source", "lambada_dev", "lambada.development.plain.txt"))
    for field_name, value, file_name in needed:
        try:
            data_file(file_name)
        except DataIntegrityError as exc:
            bad(field_name, value, f"its data file fails its check ({exc}); reinstall sweep")


# Fields that never change a grid point's result: they are left out of its identity.
_NOT_IN_HASH = {"resume", "force", "tracking", "cache_dir", "objective"}


def result_fields(cfg: SweepConfig, device: Optional[str] = None) -> Dict[str, Any]:
    """What determines a grid point's result: the config minus bookkeeping, minus knobs its method ignores.

    `device` is the resolved device ("cpu", "cuda:0"); "auto" alone would let a CPU result
    stand in for a GPU one.
    """
    from sweep.methods import get_method

    data = asdict(cfg)
    if device is not None:
        data["device"] = device.split(":")[0]
    for key in _NOT_IN_HASH:
        data.pop(key, None)
    method = get_method(cfg.method_name)
    for knob in ("bits", "group_size", "sym", "damp_percent", "desc_act", "quantize_lm_head"):
        if knob not in method.knobs:
            data.pop(knob, None)
    if not method.needs_calibration:
        data.pop("calibration", None)
    return data


def config_hash(cfg: SweepConfig, device: Optional[str] = None) -> str:
    blob = json.dumps(result_fields(cfg, device), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
