"""Memory: weight footprint, packed size, peak process/accelerator memory per phase, size on disk."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import psutil
import torch

from sweep.infra.tensors import tensor_bytes
from sweep.quant.layer_bits import record_storage_bits

MB = 1024 * 1024


def footprint_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers as they sit in memory now (transformers' get_memory_footprint, with
    tensor subclasses counted by what they hold)."""
    return sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def weight_footprint_mb(model: torch.nn.Module, unregistered_bytes: int = 0) -> float:
    """`footprint_bytes` plus weight tensors a backend keeps outside parameters and buffers
    (QuantReport.unregistered_weight_bytes: HQQ's scales and zeros), in MB."""
    return (footprint_bytes(model) + unregistered_bytes) / MB


def decode_read_mb(model: torch.nn.Module, unregistered_bytes: int = 0) -> float:
    """Weight bytes one decode step streams from memory: the footprint less the input embedding
    table, of which a step reads only its tokens' rows, unless that table is also the (tied)
    output head, which every step reads whole."""
    footprint = footprint_bytes(model) + unregistered_bytes
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = getattr(embeddings, "weight", None)
    if table is None or (head is not None and getattr(head, "weight", None) is table):
        return footprint / MB
    return (footprint - table.numel() * table.element_size()) / MB


def packed_weights_mb(model: torch.nn.Module, quantized: Dict[str, dict], sym: bool) -> float:
    """Size of the weights in a packed low-bit format: quantized linears at their bits plus
    per-group scales/zeros, every other tensor at its current dtype. Computed, not measured,
    so that simulated runs report what their packed form would weigh."""
    quantized_params = set()
    total_bits = 0.0
    for name, rec in quantized.items():
        module = model.get_submodule(name)
        quantized_params.add(id(module.weight))
        bpw = record_storage_bits(rec, sym)
        total_bits += bpw * module.weight.numel()
    seen = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen or id(tensor) in quantized_params:
            continue
        seen.add(id(tensor))
        total_bits += tensor.numel() * tensor.element_size() * 8
    return total_bits / 8 / MB


def directory_size_mb(directory: str, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern) if p.is_file()) / MB


def disk_size_mb(model: torch.nn.Module) -> float:
    """Size of `save_pretrained` output (safetensors) in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return directory_size_mb(tmp)


def _nvml_used_bytes():
    """A function returning the GPU's used memory as NVML sees it (all processes, incl. non-torch
    allocations such as CUDA context and library workspaces), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:  # noqa: BLE001 - NVML is optional (absent on CPU machines, some containers)
        return None


class PeakMemory:
    """Peak memory of each named phase: process RSS (sampled) and, on CUDA, torch's allocator
    peaks (allocated, reserved) and the device's used memory sampled through NVML."""

    def __init__(self, device: str, interval_s: float = 0.05):
        self.device = device
        self.interval_s = interval_s
        self.peaks: Dict[str, float] = {}
        self._nvml_used = _nvml_used_bytes() if device.startswith("cuda") else None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        proc = psutil.Process(os.getpid())
        peak = [proc.memory_info().rss]
        cuda = self.device.startswith("cuda")
        nvml = self._nvml_used
        nvml_peak = [nvml() if nvml else 0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval_s):
                peak[0] = max(peak[0], proc.memory_info().rss)
                if nvml:
                    nvml_peak[0] = max(nvml_peak[0], nvml())

        thread = threading.Thread(target=sample, daemon=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], proc.memory_info().rss)
            self.peaks[f"rss_peak_mb.{name}"] = peak[0] / MB
            if cuda:
                torch.cuda.synchronize()
                self.peaks[f"gpu_allocated_peak_mb.{name}"] = torch.cuda.max_memory_allocated() / MB
                self.peaks[f"gpu_reserved_peak_mb.{name}"] = torch.cuda.max_memory_reserved() / MB
                if nvml:
                    self.peaks[f"gpu_nvml_used_peak_mb.{name}"] = max(nvml_peak[0], nvml()) / MB

    def overall_peak_mb(self) -> float:
        """The number the report shows: accelerator peak on GPU, process peak on CPU."""
        key = "gpu_allocated_peak_mb." if self.device.startswith("cuda") else "rss_peak_mb."
        values = [v for k, v in self.peaks.items() if k.startswith(key)]
        return max(values) if values else float("nan")


def timed() -> "Timer":
    return Timer()


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
