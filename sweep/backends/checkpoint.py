"""Moving models between memory and checkpoint directories, for libraries that quantize from a path."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import torch

from sweep.backends.tinygemm_fusion import FusedGatedMLP, FusedQKVProjection


def save_for_backend(model: torch.nn.Module, tokenizer, directory: str) -> str:
    """Save the model as the run has it (dtype, truncation, random init) with its tokenizer."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def kernel_classes(model: torch.nn.Module,
                   packages=("gptqmodel", "auto_round", "auto_round_extension", "bitsandbytes", "sweep")) -> List[str]:
    """Class names of the modules that run packed weights (the low-bit kernels in use), and of sweep's
    wrappers that fuse several of them into one matmul (FusedQKVProjection, FusedGatedMLP)."""
    names = set()
    for module in model.modules():
        cls = type(module)
        root = cls.__module__.split(".")[0]
        if isinstance(module, (FusedGatedMLP, FusedQKVProjection)):  # hold no weights themselves
            names.add(cls.__name__)
        elif root in packages or "Linear4bit" in cls.__name__ or "Linear8bit" in cls.__name__:
            if any(isinstance(t, torch.Tensor) for t in module.buffers(recurse=False)) or \
                    any(True for _ in module.parameters(recurse=False)):
                names.add(cls.__name__ if root != "auto_round_extension" else cls.__module__.split(".", 1)[1])
    return sorted(names)


def drop_single_device_hooks(model: torch.nn.Module) -> int:
    """Remove accelerate's device-placement hooks from a model whose weights all sit on one device.

    GPTQModel dispatches a CUDA load with an `AlignDevicesHook` per decoder layer (and on the
    embeddings, norm and head). On one device they move nothing, but the accelerate release on the
    H100 marked their pre_forward compile-disabled, so each one split the compiled decode step: the
    packed 8B model's static decode had 55 graph breaks (fp16: 0). accelerate 1.16 traces through them;
    removing them still drops a Python call per module and per step. Returns how many were removed.
    """
    hooked = [m for m in model.modules() if hasattr(m, "_hf_hook")]
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not hooked or len(devices) != 1:
        return 0
    from accelerate.hooks import remove_hook_from_module

    for module in hooked:
        remove_hook_from_module(module)
    return len(hooked)


def free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scratch_dir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return path


# Backends whose quantized modules live in the model object (hqq, optimum-quanto) save their state
# here: the whole model as one safetensors file plus a manifest naming the quantized modules and
# their settings, which is what is needed to rebuild those modules before loading the tensors.
STATE_FILE = "model.safetensors"


def save_quantized_state(model: torch.nn.Module, directory: str, manifest_name: str, manifest) -> str:
    from safetensors.torch import save_model

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_model(model, str(Path(directory) / STATE_FILE))  # tied tensors once, under one of their names
    (Path(directory) / manifest_name).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory


def read_manifest(directory: str, manifest_name: str):
    return json.loads((Path(directory) / manifest_name).read_text())


def load_quantized_state(model: torch.nn.Module, directory: str, device: str) -> None:
    """Load a saved state into a model whose quantized modules have been rebuilt (empty) already."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / STATE_FILE), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = _tied_names(model)
    missing = [k for k in missing if not any(alias in state for alias in aliases.get(k, ()))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _tied_names(model: torch.nn.Module) -> Dict[str, List[str]]:
    """For each parameter name, the other names of the same tensor (a tied lm_head)."""
    groups: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: [other for other in group if other != name] for group in groups.values() for name in group}
