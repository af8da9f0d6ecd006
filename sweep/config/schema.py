"""The config schema of one grid point: what every field is, its type and its default.

Hydra composes `conf/`; sweep.validation turns that into these dataclasses (OmegaConf
type-checks every field on the way) and checks ranges, method capabilities and the model's
shapes, before any model is loaded. This module depends on nothing else in sweep, so every
stage can name the section of the config it reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

# The Hydra config tree (conf/config.yaml and its groups) whose schema this is.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

BITS_RANGE = range(1, 9)
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EVAL_TASKS = ("wikitext", "lambada")
MODEL_INITS = ("pretrained", "random")
BENCH_MODES = ("eager", "static", "graph", "both", "all")
CALIBRATION_SOURCES = ("lambada_dev", "self_generated")   # besides local files and hub:<dataset>
# calibration.nsamples × calibration.seqlen when left null, by device type, chosen by docs/calibration.md's
# study: on a GPU 128 windows beat 32 (H200, whole test sets), while 2048-token windows, the GPTQ paper's
# size, did worse than 256 on the embedded model; on CPU 32 × 256 keeps a point to minutes.
CALIBRATION_DEFAULTS = {"cpu": (32, 256), "cuda": (128, 256)}


class ConfigError(ValueError):
    """A config value that cannot work. The message names the field, the value and what is allowed."""


@dataclass
class ModelConfig:
    # Display name; also the default MLflow experiment.
    name: str = "smollm2-135m"
    # "embedded:<id>" (shipped through PyPI, see sweep/models.py), a local directory, or a Hub id.
    path: str = "embedded:smollm2-135m-instruct"
    # auto: float16 on CUDA; on CPU bfloat16 where the cores have bf16 matrix instructions, else float32.
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
class SelfGenerationConfig:
    """How the model writes its own calibration text (calibration.source=self_generated)."""

    temperature: float = 1.0
    top_p: float = 0.95
    # Each sample starts from one of these, in turn: "" = the tokenizer's BOS token alone (a base
    # model's own distribution), else a neutral opening after BOS.
    openings: List[str] = field(default_factory=lambda: [""])
    # For instruct models that expect a conversation: a user message wrapped in the model's chat
    # template starts every sample instead (null: no template, the base-model way).
    chat_prompt: Optional[str] = None
    batch_size: int = 32


@dataclass
class CalibrationConfig:
    # "lambada_dev" (vendored LAMBADA development split), "self_generated" (the unquantized model writes
    # it), a local .txt/.jsonl file, or "hub:<dataset>[:<config>]".
    source: str = "lambada_dev"
    # null: the device's default (CALIBRATION_DEFAULTS: 32 × 256 on CPU, 128 × 256 on a GPU).
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: int = 0
    # Field read from .jsonl files and Hub datasets.
    text_field: str = "text"
    # Expected sha256 of a local source file: checked before anything runs (and part of the config hash).
    sha256: Optional[str] = None
    generation: SelfGenerationConfig = field(default_factory=SelfGenerationConfig)


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=lambda: list(EVAL_TASKS))
    # The dtype the model is scored in: auto = as it was quantized and run (model.dtype); float32 /
    # bfloat16 / float16 cast an unquantized or simulated model for the evaluation (packed models
    # keep their kernels' dtype). The lm-eval parity test runs float32.
    dtype: str = "auto"
    # Documents (wikitext) or examples (lambada) per task; null evaluates the whole test set.
    limit: Dict[str, Optional[int]] = field(default_factory=lambda: {"wikitext": 2, "lambada": 200})
    batch_size: int = 8
    # Context window for rolling perplexity; the model's own maximum when null.
    max_length: Optional[int] = 2048
    # lm-eval's bootstrap for its perplexity standard errors (0 = none, and then lm-eval reports no
    # stderr at all, not even accuracy's). sweep's own intervals (sweep/measure/uncertainty.py) come
    # from the per-item results either way.
    bootstrap_iters: int = 100


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
    # Time simulated (quantize-dequantized) weights too. They run at the unquantized model's speed,
    # which the baseline measures, so by default they get their sample generations only.
    simulated: bool = False


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
    # Every sweep includes the unquantized baseline of its model, eval and device (reused from the
    # store when a finished one matches, run once otherwise); false leaves it out.
    baseline: bool = True

    @property
    def method_name(self) -> str:
        return str(self.method["name"])


def register_configs() -> None:
    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)
