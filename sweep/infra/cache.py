"""Checksummed on-disk cache for things every grid point would otherwise rebuild.

An entry is a file plus a manifest (`<file>.json`) holding the sha256 of the file and the inputs
it was built from. The key is a hash of those inputs, so a change of any input makes a new entry
rather than reusing a stale one. Reading an entry checks its sha256 first: a truncated or
corrupted file (a job killed mid-write, a full disk, bit rot) is reported, deleted and rebuilt.
Writes go to a temporary file that is renamed into place, under a file lock, so concurrent jobs
build an entry once and never read a half-written one.

Tensors are stored as safetensors, never pickled. The cache lives under `cache_dir`
(`$SWEEP_CACHE` overrides it), next to the embedded model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict

if TYPE_CHECKING:  # annotations only: the report imports this module and needs no torch
    import torch

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(inputs: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_intact(path: Path) -> bool:
    """True if `path` and its manifest exist and the file's sha256 matches the manifest."""
    manifest = _manifest(path)
    if not path.is_file() or not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    return sha256_file(path) == expected


def cached_file(path: Path, build: Callable[[Path], None], inputs: Dict[str, Any]) -> Path:
    """`path`, built by `build(tmp_path)` unless an intact entry is already there; rebuilt if corrupted."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    if is_intact(path):
        return path
    with FileLock(str(path) + ".lock"):
        if is_intact(path):
            return path
        if path.exists():
            log.warning("cache entry %s failed its checksum; rebuilding it", path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        build(tmp)
        manifest = {"sha256": sha256_file(tmp), "inputs": inputs}
        _manifest(path).write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(path)
    return path


def cached_tensor(root: Path, kind: str, inputs: Dict[str, Any], build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor kept under `root/kind/`, keyed by `inputs`, built once by `build()`."""
    from safetensors.torch import load_file, save_file

    path = Path(root) / kind / f"{key_of(inputs)}.safetensors"
    cached_file(path, lambda tmp: save_file({"data": build().contiguous()}, str(tmp)), inputs)
    return load_file(str(path))["data"]


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(os.environ.get("SWEEP_CACHE", cache_dir)))
