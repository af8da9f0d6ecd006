"""One grid point: load → calibrate → quantize → measure → log, as one MLflow run.

A failure anywhere is recorded on the run (FAILED, error class and message as tags, the
traceback as an artifact) and returned, so the other grid points of a sweep go on.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml

from sweep import calibration as calib
from sweep.config import SweepConfig, config_hash
from sweep.dataset_inputs import dataset_inputs
from sweep.measure import memory
from sweep.backends.checkpoint import free_accelerator_memory, scratch_dir
from sweep.measure.latency import bandwidth_fraction, device_bandwidth_gbps, measure_latency
from sweep.measure.quality import evaluate
from sweep.methods import get_method
from sweep.methods.base import PACKED, UNQUANTIZED
from sweep.model_checks import check_against_model
from sweep.models import cache_root, load_model, resolve_device, resolve_dtype
from sweep.orphans import close_orphans, owner_tags
from sweep.progress import Progress, sweep_eta
from sweep.quant.layer_bits import average_bits
from sweep.redact import public_config, redact_uri
from sweep.tracking import (TAG_CONFIG_HASH, TAG_NONFINITE, TAG_REUSED_PREFIX, TAG_ROLE, TAG_SWEEP_ID, Tracker,
                            flatten)

log = logging.getLogger(__name__)


@dataclass
class SweepContext:
    """Where a grid point sits in its sweep (absent for a single run)."""

    sweep_id: str
    parent_run_id: str
    index: int
    total: int
    started: Optional[float] = None   # time.time() when the sweep (this launch of it) started


@dataclass
class PointResult:
    status: str                   # FINISHED, FAILED, SKIPPED
    run_id: Optional[str]
    metrics: Dict[str, float]
    error: Optional[str] = None


def describe(cfg: SweepConfig) -> str:
    method = get_method(cfg.method_name)
    parts = [cfg.method_name]
    for knob in ("bits", "group_size", "sym", "damp_percent", "desc_act"):
        if knob in method.knobs:
            parts.append(f"{knob}={getattr(cfg, knob)}")
    if cfg.method.get("layer_bits"):
        parts.append(f"layer_bits=<{len(cfg.method['layer_bits'])} overrides>")
    return " ".join(parts)


def run_point(cfg: SweepConfig, ctx: Optional[SweepContext] = None, log_file: Optional[Path] = None) -> PointResult:
    label = describe(cfg)
    if ctx is not None:
        label = f"[{ctx.index + 1}/{ctx.total}] {label}"
    progress = Progress(label)
    if ctx is not None and ctx.started:
        progress.say(sweep_eta(ctx.started, ctx.index, ctx.total))
    device = resolve_device(cfg.device)
    chash = config_hash(cfg, device)
    tracker = Tracker(cfg.tracking, cfg.model.name)
    for orphan in close_orphans(tracker, f"tags.`{TAG_CONFIG_HASH}` = '{chash}'"):
        progress.say(f"run {orphan} of this grid point lost its process earlier; marked KILLED")

    if cfg.resume and not cfg.force:
        previous = tracker.find_finished(chash)
        if previous is not None:
            progress.say(f"already finished as run {previous.info.run_id} (config hash {chash}); skipped "
                         "(force=true re-runs it)")
            if ctx is not None:
                tracker.set_tags(ctx.parent_run_id, {TAG_REUSED_PREFIX + chash: previous.info.run_id})
            return PointResult("SKIPPED", previous.info.run_id, dict(previous.data.metrics))

    tags = {TAG_ROLE: "point", TAG_CONFIG_HASH: chash, "method": cfg.method_name, "model": cfg.model.name,
            "model.path": cfg.model.path, "device": device, **environment_tags(device), **owner_tags()}
    if ctx is not None:
        tags[TAG_SWEEP_ID] = ctx.sweep_id
    run_id = tracker.create_run(describe(cfg), tags, parent_id=ctx.parent_run_id if ctx else None)
    try:  # from here on, any way out closes the run
        logged_config = public_config(asdict(cfg))  # no secrets in params or artifacts
        tracker.log_params(run_id, flatten(logged_config, whole={"method.layer_bits"}))
        tracker.log_text(run_id, yaml.safe_dump(logged_config, sort_keys=False), "config.yaml")
        progress.say(f"MLflow run {run_id} in {redact_uri(tracker.uri)}")
        metrics = _measure(cfg, device, tracker, run_id, progress)
    except KeyboardInterrupt:
        _record_failure(tracker, run_id, "KILLED", log_file)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one grid point must be recorded, not lost
        progress.say(f"[red]FAILED: {type(exc).__name__}: {exc}[/red]")
        _record_failure(tracker, run_id, "FAILED", log_file)
        return PointResult("FAILED", run_id, {}, error=f"{type(exc).__name__}: {exc}")
    finally:
        free_accelerator_memory()
    if log_file and log_file.is_file():
        tracker.log_file(run_id, log_file)
    tracker.finish(run_id, "FINISHED")
    progress.say(f"[green]finished[/green] in {sum(progress.phase_seconds.values()):.0f}s")
    return PointResult("FINISHED", run_id, metrics)


def _measure(cfg: SweepConfig, device: str, tracker: Tracker, run_id: str, progress: Progress) -> Dict[str, float]:
    torch.manual_seed(cfg.seed)
    peaks = memory.PeakMemory(device)
    metrics: Dict[str, float] = {}
    method_cls = get_method(cfg.method_name)
    method = method_cls(cfg)
    cache = cache_root(cfg.cache_dir)
    tracker.client.log_inputs(run_id, datasets=dataset_inputs(cfg, method_cls.needs_calibration))

    with progress.phase("load"), peaks.phase("load"):
        model, tokenizer = load_model(cfg.model, device, cfg.cache_dir, allow_hub=cfg.allow_hub)
    metrics["time.load_s"] = progress.phase_seconds["load"]
    check_against_model(cfg, model.config.to_dict())  # a Hub model's shapes are known only now
    tracker.set_tags(run_id, {"dtype": str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", ""),
                              "model.class": type(model).__name__,
                              "model.parameters": sum(p.numel() for p in model.parameters()),
                              "model.init": cfg.model.init,
                              # Random weights measure memory and speed at a real size; their quality is noise.
                              "quality.meaningful": str(cfg.model.init != "random").lower()})

    samples = None
    if method_cls.needs_calibration:
        with progress.phase("calibrate"):
            samples = calib.cached_samples(tokenizer, cfg.calibration, cache)
        tracker.set_tags(run_id, {"calibration": calib.describe(cfg.calibration),
                                  "calibration.tokens": sum(s.numel() for s in samples)})
    else:
        tracker.set_tags(run_id, {"calibration": "none"})

    workdir = tempfile.mkdtemp(prefix="quantize-", dir=scratch_dir(str(cache), "scratch"))
    method.attach(tokenizer, workdir)
    try:
        with progress.phase("quantize"), peaks.phase("quantize"):
            report = method.quantize(model, samples, progress)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        if report.model is not None:
            # Path-based backends reload their packed checkpoint: measure that model from here on.
            model, report.model = report.model, None
        return _measure_quantized(cfg, device, tracker, run_id, progress, peaks, metrics, model, tokenizer,
                                  report, cache)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure_quantized(cfg, device, tracker, run_id, progress, peaks, metrics, model, tokenizer, report, cache):
    quantized = report.weights != UNQUANTIZED
    metrics["time.quantize_s"] = progress.phase_seconds["quantize"] if quantized else 0.0
    tracker.set_tags(run_id, {"backend": report.backend, "weights": report.weights, "kernel": report.kernel,
                              "bits": cfg.bits if quantized else "none",
                              "group_size": cfg.group_size if quantized else "none",
                              "layer_bits": ("mixed" if cfg.method.get("layer_bits") else "uniform") if quantized else "none"})
    if report.layers:
        tracker.log_json(run_id, report.layers, "quantized_layers.json")
    if report.notes:
        tracker.log_text(run_id, "\n".join(report.notes), "quantize_notes.txt")
    metrics["quant.layers"] = float(report.num_layers)

    metrics["memory.weights_mb"] = memory.weight_footprint_mb(model)
    metrics["memory.decode_read_mb"] = memory.decode_read_mb(model)
    if report.weights == PACKED:
        # The packed model is in memory: its footprint is measured, not estimated.
        metrics["memory.packed_weights_mb"] = metrics["memory.weights_mb"]
    else:
        metrics["memory.packed_weights_mb"] = memory.packed_weights_mb(model, report.layers, cfg.sym)
    metrics.update(average_bits(report.layers, cfg.sym))
    metrics.update(report.metrics)
    for name, content in report.artifacts.items():
        tracker.log_json(run_id, content, name)
    if report.saved_dir:
        metrics["memory.disk_mb"] = memory.directory_size_mb(report.saved_dir, "*.safetensors")
    elif cfg.bench.disk_size:
        metrics["memory.disk_mb"] = memory.disk_size_mb(model)

    if cfg.bench.repeats > 0:
        with progress.phase("generate"), peaks.phase("generate"):
            latencies, latency_errors = measure_latency(model, tokenizer, cfg.bench, progress)
        for mode, error in latency_errors.items():
            tracker.set_tags(run_id, {f"latency.{mode}.error": error})
            progress.say(f"[yellow]latency mode {mode} failed: {error}[/yellow]")
        for mode, result in latencies.items():
            prefix = "latency." if mode == "eager" else f"latency.{mode}."
            mode_metrics = result.metrics()
            metrics.update({prefix + k: v for k, v in mode_metrics.items()})
            if device.startswith("cuda") and "tokens_per_s" in mode_metrics:
                # Decode at batch b streams every weight once per step: bytes x steps/s vs the device bandwidth.
                metrics[prefix + "bandwidth_fraction"] = bandwidth_fraction(
                    metrics["memory.decode_read_mb"], mode_metrics["tokens_per_s"] / cfg.bench.batch_size)
        if device.startswith("cuda"):
            metrics["device.bandwidth_gbps"] = device_bandwidth_gbps()
        latency = latencies.get("eager") or next(iter(latencies.values()))
        tracker.log_json(run_id, latency.samples, "samples.json")
        tracker.log_json(run_id, {"ttft_ms": latency.ttft_ms, "itl_ms": latency.itl_ms,
                                  "request_ms": latency.request_ms, "new_tokens": latency.new_tokens},
                         "latency_samples.json")

    if cfg.eval.tasks:
        with progress.phase("eval"), peaks.phase("eval"):
            quality, raw = evaluate(model, tokenizer, cfg.eval, cache, seed=cfg.seed)
        metrics.update(quality)
        metrics["time.eval_s"] = progress.phase_seconds["eval"]
        tracker.log_json(run_id, raw, "lm_eval_results.json")

    metrics.update({f"memory.{k}": v for k, v in peaks.peaks.items()})
    metrics["memory.peak_mb"] = peaks.overall_peak_mb()
    bad = tracker.log_metrics(run_id, metrics)
    if bad:
        # NaN/inf are never logged as numbers: the run says which metrics were not finite.
        tracker.set_tags(run_id, {TAG_NONFINITE: ",".join(bad)})
        progress.say(f"[yellow]non-finite metrics (not logged): {', '.join(bad)}[/yellow]")
    del model
    return metrics


def _record_failure(tracker: Tracker, run_id: str, status: str, log_file: Optional[Path]) -> None:
    import sys

    exc_type, exc, _ = sys.exc_info()
    try:
        tracker.set_tags(run_id, {"error.class": exc_type.__name__ if exc_type else status,
                                  "error.message": str(exc)[:5000] if exc else status})
        tracker.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
        if log_file and log_file.is_file():
            tracker.log_file(run_id, log_file)
    finally:
        tracker.finish(run_id, status)


def environment_tags(device: str) -> Dict[str, Any]:
    import importlib.metadata as md

    tags: Dict[str, Any] = {"python": platform.python_version(), "host.cpu": platform.processor() or platform.machine()}
    for pkg in ("torch", "transformers", "lm_eval", "mlflow", "hydra-core", "gptqmodel", "auto-round"):
        try:
            tags[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    tags["device.name"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    if device.startswith("cuda"):  # which physical GPU(s) this job saw (the gpus launcher pins one per job)
        tags["device.cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    tags["git.sha"] = _git_sha()
    return tags


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
