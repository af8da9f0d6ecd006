"""Checks on a model that need only its directory listing and config.json, never its weights.

- `model_dir_errors`: a local model directory must hold a config, a tokenizer and safetensors
  weights (pickle-based `.bin`/`.pt` checkpoints can run code when loaded; sweep refuses them).
- `group_size_errors`: a group size that does not divide a quantized layer's `in_features` leaves
  a ragged last group. The simulated torch backends handle that; packed kernels generally do not,
  so each method says whether it can (`QuantMethod.ragged_groups`) and the check runs once the
  model's config.json is known, before anything is quantized.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def model_dir_errors(path: Path, field: str = "model.path", tokenizer_only: bool = False) -> List[str]:
    """What a local model directory lacks; `tokenizer_only` for model.init=random, where it supplies just that."""
    errors = []
    if not tokenizer_only and not (path / "config.json").is_file():
        errors.append(f"{field}={str(path)!r} has no config.json: not a Hugging Face model directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        errors.append(f"{field}={str(path)!r} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} "
                      "(save it with tokenizer.save_pretrained(dir))")
    if not tokenizer_only and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        why = (f"only pickle-based weights ({', '.join(pickled[:3])}), which sweep does not load because "
               "unpickling can run code; convert them with model.save_pretrained(dir, safe_serialization=True)"
               if pickled else "no *.safetensors weights")
        errors.append(f"{field}={str(path)!r} has {why}")
    return errors


def linear_in_features(config: Dict[str, Any]) -> Dict[str, int]:
    """in_features of the decoder's linear layers, by what sets them, from a (Llama-style) config.json."""
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    found: Dict[str, int] = {}
    hidden = text.get("hidden_size")
    if hidden:
        found["hidden_size (q/k/v, gate/up projections)"] = int(hidden)
        heads = text.get("num_attention_heads")
        head_dim = text.get("head_dim") or (hidden // heads if heads else None)
        if heads and head_dim:
            found["num_attention_heads*head_dim (o_proj)"] = int(heads) * int(head_dim)
    if text.get("intermediate_size"):
        found["intermediate_size (down_proj)"] = int(text["intermediate_size"])
    return found


def read_model_config(location: str) -> Dict[str, Any]:
    path = Path(location) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def group_size_errors(cfg, model_config: Dict[str, Any]) -> List[str]:
    from sweep.methods import get_method

    method = get_method(cfg.method_name)
    if "group_size" not in method.knobs or cfg.group_size == -1 or method.handles_ragged_groups(cfg):
        return []
    sizes = linear_in_features(model_config)
    ragged = {what: n for what, n in sizes.items() if n % cfg.group_size}
    if not ragged:
        return []
    allowed = [g for g in (16, 32, 64, 128, 256) if all(n % g == 0 for n in sizes.values())]
    listing = ", ".join(f"{n} = {what}" for what, n in ragged.items())
    return [f"group_size={cfg.group_size} does not divide in_features of model {cfg.model.name!r} ({listing}), "
            f"and method {cfg.method_name} cannot quantize a ragged last group: allowed here are -1"
            + "".join(f", {g}" for g in allowed)]


def check_against_model(cfg, model_config: Dict[str, Any] | None = None) -> None:
    """Raise ConfigError for settings this model's shapes rule out.

    Before loading, from the config.json of a local or embedded model (no weights are read); a Hub
    model's config is only known once loaded, so run.py checks again with it before quantizing.
    """
    from sweep.config import ConfigError
    from sweep.models import model_location

    if model_config is None and cfg.model.init == "random":
        model_config = dict(cfg.model.architecture or {})  # the path supplies only the tokenizer
    if model_config is None:
        model_config = read_model_config(model_location(cfg.model, cfg.cache_dir))
    errors = group_size_errors(cfg, model_config)
    if errors:
        raise ConfigError("invalid config for this model:\n  - " + "\n  - ".join(errors))
