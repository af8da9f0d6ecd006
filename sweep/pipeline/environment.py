"""What a run ran on, as tags: Python and package versions, the device, the code's git commit."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict

import torch

from sweep.infra.hardware import bf16_instructions, cpu_has_bf16, cpu_model

PACKAGES = ("torch", "transformers", "lm_eval", "mlflow", "hydra-core", "gptqmodel", "auto-round")


def environment_tags(device: str) -> Dict[str, Any]:
    tags: Dict[str, Any] = {"python": platform.python_version(), "host.cpu": cpu_model()}
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    tags["device.name"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    if device.startswith("cuda"):  # which physical GPU(s) this job saw (the gpus launcher pins one per job)
        tags["device.cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    tags["git.sha"] = git_sha()
    tags.update(threads=torch.get_num_threads(), **{"threads.inter_op": torch.get_num_interop_threads(),
                                                   "cpu.bf16": str(cpu_has_bf16()).lower(),
                                                   "cpu.bf16_instructions": bf16_instructions(),
                                                   "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "")})
    return tags


def git_sha() -> str:
    """The checkout's commit, with `-dirty` when tracked files have changed; "unknown" outside git."""
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
