"""What a model directory and its config.json say, read without loading any weights.

- `model_dir_errors`: a local model directory must hold a config, a tokenizer and safetensors
  weights (pickle-based `.bin`/`.pt` checkpoints can run code when loaded; sweep refuses them).
- `linear_in_features`: the decoder linears' input widths, which group sizes must divide for
  kernels that cannot take a ragged last group (checked in sweep.validation.model_fit).
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
