"""One grid point: load → calibrate → quantize → measure → log, as one MLflow run.

`run_point` decides whether the point runs at all (a finished run with the same config hash is
reused), opens its MLflow run and closes it whatever happens. A failure anywhere is recorded on
the run (FAILED, error class and message as tags, the traceback as an artifact) and returned, so
the other grid points of a sweep go on. In between, `_measure` walks the phases in order; each
phase gets the `PointRun` (the config, the device, the run to log to, progress and memory
peaks) and adds what it measured to it.
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml

from sweep.backends.checkpoint import free_accelerator_memory, scratch_dir
from sweep.config.schema import SweepConfig
from sweep.data import calibration
from sweep.infra.cache import cache_root
from sweep.infra.determinism import deterministic
from sweep.infra.preload import preload
from sweep.infra.progress import Progress, sweep_eta
from sweep.infra.redact import public_config, redact_uri
from sweep.measure import memory
from sweep.measure.latency import bandwidth_fraction, device_bandwidth_gbps, measure_latency, sample_generations
from sweep.measure.artifacts import ITEMS_ARTIFACT
from sweep.measure.quality import evaluate
from sweep.methods import get_method
from sweep.methods.base import PACKED, SIMULATED, UNQUANTIZED, QuantReport
from sweep.models.loading import load_model, model_fingerprint, resolve_device, resolve_dtype
from sweep.pipeline.environment import environment_tags
from sweep.pipeline import reuse
from sweep.pipeline.identity import baseline_config, config_group, config_hash, seeded
from sweep.quant.layer_bits import average_bits
from sweep.quant.layers import decoder_checksum
from sweep.tracking.dataset_inputs import dataset_inputs
from sweep.tracking.orphans import close_orphans, owner_tags
from sweep.tracking.tracker import (TAG_BASELINE_HASH, TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_NONFINITE,
                                    TAG_REUSED_PREFIX, TAG_ROLE, TAG_SEEDED, TAG_SWEEP_ID, Tracker, flatten)
from sweep.validation.model_fit import check_against_model

log = logging.getLogger(__name__)

# What every run imports (the model's code, the tracking client), and lm-eval where a run evaluates.
RUN_LIBRARIES = ("transformers.modeling_utils", "mlflow.tracking")
EVAL_LIBRARIES = ("lm_eval.evaluator", "lm_eval.models.huggingface")


@dataclass
class SweepContext:
    """Where a grid point sits in its sweep (absent for a single run)."""

    sweep_id: str
    parent_run_id: str
    index: int
    total: int
    started: Optional[float] = None   # time.time() when the sweep (this launch of it) started
    role: str = "point"               # "baseline": the fp16 run the sweep added for its deltas

    def label(self) -> str:
        return "[baseline]" if self.role == "baseline" else f"[{self.index + 1}/{self.total}]"


class PointInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a grid point, after its run was closed as KILLED (run_id says which)."""

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} interrupted")
        self.run_id = run_id


@dataclass
class PointResult:
    status: str                   # FINISHED, FAILED, SKIPPED
    run_id: Optional[str]
    metrics: Dict[str, float]
    error: Optional[str] = None


@dataclass
class PointRun:
    """One grid point while it runs: what it is, where it runs and logs, and what it has measured so far."""

    cfg: SweepConfig
    device: str                   # resolved: "cpu", "cuda", ...
    tracker: Tracker
    run_id: str
    progress: Progress
    peaks: memory.PeakMemory
    cache: Path                   # the cache root (calibration samples, lm-eval task files, scratch)
    sweep_id: Optional[str] = None  # the sweep it belongs to (None: a single run)
    metrics: Dict[str, float] = field(default_factory=dict)
    tags: Dict[str, Any] = field(default_factory=dict)   # every tag set so far (a kept model passes its own on)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A timed phase with its own memory peaks."""
        with self.progress.phase(name), self.peaks.phase(name):
            yield

    def seconds(self, phase: str) -> float:
        return self.progress.phase_seconds[phase]

    def tag(self, tags: Dict[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)
        self.tags.update(tags)

    def log_json(self, data: Any, name: str) -> None:
        self.tracker.log_json(self.run_id, data, name)


def preload_libraries(configs: Sequence[SweepConfig]) -> None:
    """Import what these runs will use before the process's first grid point (sweep/infra/preload.py says why).

    Called where a process starts its work (`python -m sweep`'s job, a sweep before its baseline), never from
    `run_point`: once a point has run, its held model exists, and what is alive at the freeze is never collected."""
    evaluates = any(cfg.eval.tasks for cfg in configs)
    preload(RUN_LIBRARIES + (EVAL_LIBRARIES if evaluates else ()))


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
        label = f"{ctx.label()} {label}"
    progress = Progress(label)
    if ctx is not None and ctx.started and ctx.role == "point":
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

    tags = {TAG_ROLE: "point", TAG_CONFIG_HASH: chash, TAG_CONFIG_GROUP: config_group(cfg, device),
            TAG_BASELINE_HASH: config_hash(baseline_config(cfg), device), TAG_SEEDED: str(seeded(cfg)).lower(),
            "method": cfg.method_name, "model": cfg.model.name, "model.path": cfg.model.path, "device": device,
            **environment_tags(device), **owner_tags()}
    if ctx is not None:
        tags[TAG_SWEEP_ID] = ctx.sweep_id
    run_id = tracker.create_run(describe(cfg), tags, parent_id=ctx.parent_run_id if ctx else None)
    try:  # from here on, any way out closes the run
        logged_config = public_config(asdict(cfg))  # no secrets in params or artifacts
        tracker.log_params(run_id, flatten(logged_config, whole={"method.layer_bits"}))
        tracker.log_text(run_id, yaml.safe_dump(logged_config, sort_keys=False), "config.yaml")
        progress.say(f"MLflow run {run_id} in {redact_uri(tracker.uri)}")
        point = PointRun(cfg, device, tracker, run_id, progress, memory.PeakMemory(device), cache_root(cfg.cache_dir),
                         sweep_id=ctx.sweep_id if ctx is not None else None)
        metrics = _measure(point)
    except KeyboardInterrupt as exc:
        _record_failure(tracker, run_id, "KILLED", log_file)
        raise PointInterrupted(run_id) from exc
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


def _measure(point: PointRun) -> Dict[str, float]:
    """Every phase of one grid point, in order; returns the metrics it logged."""
    cfg = point.cfg
    torch.manual_seed(cfg.seed)
    method_cls = get_method(cfg.method_name)
    point.tracker.client.log_inputs(point.run_id, datasets=dataset_inputs(cfg, method_cls.needs_calibration))
    key = reuse.quantized_model_key(cfg, point.device, point.sweep_id) if point.sweep_id else None
    held = reuse.take(key) if key else reuse.take("")  # a single run drops what a sweep before it held
    if held is not None:
        _reuse_quantized(point, held)
    else:
        held = _quantize_model(point, method_cls, key)
    try:
        if cfg.bench.repeats > 0:
            _measure_latency(point, held.model, held.tokenizer, held.report)
        nondeterministic_ops = list(held.nondeterministic_ops)
        if cfg.eval.tasks:
            with deterministic() as eval_ops:
                _measure_quality(point, held.model, held.tokenizer, held.report)
            nondeterministic_ops += [op for op in eval_ops if op not in nondeterministic_ops]
    except BaseException:
        reuse.discard(held)
        raise
    if key:
        reuse.keep(held)  # for the next point of this sweep that measures the same model differently
    else:
        reuse.discard(held)
    _record_determinism(point, held.report, nondeterministic_ops)
    return _log_metrics(point)


def _quantize_model(point: PointRun, method_cls, key: Optional[str]) -> reuse.HeldModel:
    """Load, calibrate and quantize; what they measured is kept with the model for a point that reuses it."""
    model, tokenizer = _load(point)
    workdir = tempfile.mkdtemp(prefix="quantize-", dir=scratch_dir(str(point.cache), "scratch"))
    try:
        # What must reproduce bit for bit runs under torch's deterministic algorithms; latency does not.
        with deterministic() as nondeterministic_ops:
            samples = _calibrate(point, model, tokenizer) if method_cls.needs_calibration else None
            model, report = _quantize(point, model, tokenizer, samples, workdir)
        if samples is None:
            point.tag({"calibration": "none", "calibration.source": "none"})
        _record_quantization(point, model, report)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    seconds = {f"time.{phase}_s": s for phase, s in point.progress.phase_seconds.items() if phase in reuse.QUANTIZE_PHASES}
    peaks = {k: v for k, v in point.peaks.peaks.items() if k.rsplit(".", 1)[-1] in reuse.QUANTIZE_PHASES}
    return reuse.HeldModel(key or "", model, tokenizer, report, point.run_id, workdir, reuse.model_dtype(model),
                           metrics={**point.metrics, **seconds}, tags=dict(point.tags), peaks=peaks,
                           nondeterministic_ops=list(nondeterministic_ops))


def _reuse_quantized(point: PointRun, held: reuse.HeldModel) -> None:
    """Log, for this run, what the run that quantized the model measured of it (docs: sweep/pipeline/reuse.py)."""
    point.progress.say(f"quantized model of run {held.run_id} reused (this point differs only in bench/eval)")
    point.tag({**held.tags, reuse.TAG_REUSED_FROM: held.run_id})
    # Recomputed, not copied: the tag vouches for the weights this run measures, whatever ran on them before.
    point.tag({"weights.sha256": decoder_checksum(held.model)})
    point.metrics.update(held.metrics)
    point.peaks.peaks.update(held.peaks)
    _log_quantization_artifacts(point, held.report)


def _load(point: PointRun) -> Tuple[torch.nn.Module, Any]:
    cfg = point.cfg
    with point.phase("load"):
        model, tokenizer = load_model(cfg.model, point.device, cfg.cache_dir, allow_hub=cfg.allow_hub)
    point.metrics["time.load_s"] = point.seconds("load")
    check_against_model(cfg, model.config.to_dict())  # a Hub model's shapes are known only now
    point.tag({"dtype": str(resolve_dtype(cfg.model.dtype, point.device)).replace("torch.", ""),
               "model.class": type(model).__name__,
               "model.parameters": sum(p.numel() for p in model.parameters()),
               "model.init": cfg.model.init,
               # Random weights measure memory and speed at a real size; their quality is noise.
               "quality.meaningful": str(cfg.model.init != "random").lower()})
    return model, tokenizer


def _calibrate(point: PointRun, model, tokenizer) -> List[torch.Tensor]:
    cfg = point.cfg
    with point.progress.phase("calibrate"):
        # Self-generated text is written by this (still unquantized) model: cached per model, dtype, device.
        samples = calibration.cached_samples(tokenizer, cfg.calibration, point.cache, model=model,
                                             model_fingerprint=model_fingerprint(cfg.model, cfg.cache_dir,
                                                                                 point.device))
    point.tag({"calibration": calibration.describe(cfg.calibration), "calibration.source": cfg.calibration.source,
               "calibration.tokens": sum(s.numel() for s in samples),
               "calibration.fingerprint": calibration.fingerprint(samples)})
    return samples


def _quantize(point: PointRun, model, tokenizer, samples, workdir: str) -> Tuple[torch.nn.Module, QuantReport]:
    method = get_method(point.cfg.method_name)(point.cfg)
    method.attach(tokenizer, workdir)
    with point.phase("quantize"):
        report = method.quantize(model, samples, point.progress)
        if point.device.startswith("cuda"):
            torch.cuda.synchronize()
    if report.model is not None:
        # Path-based backends reload their packed checkpoint: measure that model from here on.
        model, report.model = report.model, None
    return model, report


def _record_quantization(point: PointRun, model, report: QuantReport) -> None:
    """What the method did (tags, per-layer records, notes) and the sizes of the weights it left."""
    cfg, metrics = point.cfg, point.metrics
    quantized = report.weights != UNQUANTIZED
    metrics["time.quantize_s"] = point.seconds("quantize") if quantized else 0.0
    point.tag({"backend": report.backend, "weights": report.weights, "kernel": report.kernel,
               "bits": cfg.bits if quantized else "none",
               "group_size": cfg.group_size if quantized else "none",
               "layer_bits": ("mixed" if cfg.method.get("layer_bits") else "uniform") if quantized else "none"})
    if report.tags:
        point.tag(report.tags)
    # One checksum of the quantized weights per run: equal checksums, bit-identical weights.
    point.tag({"weights.sha256": decoder_checksum(model)})
    _log_quantization_artifacts(point, report)
    metrics["quant.layers"] = float(report.num_layers)

    metrics["memory.weights_mb"] = memory.weight_footprint_mb(model, report.unregistered_weight_bytes)
    metrics["memory.decode_read_mb"] = memory.decode_read_mb(model, report.unregistered_weight_bytes)
    if report.weights == PACKED:
        # The packed model is in memory: its footprint is measured, not estimated.
        metrics["memory.packed_weights_mb"] = metrics["memory.weights_mb"]
    else:
        metrics["memory.packed_weights_mb"] = memory.packed_weights_mb(model, report.layers, cfg.sym)
    metrics.update(average_bits(report.layers, cfg.sym))
    metrics.update(report.metrics)
    if report.saved_dir:
        metrics["memory.disk_mb"] = memory.directory_size_mb(report.saved_dir, "*.safetensors")
    elif cfg.bench.disk_size:
        metrics["memory.disk_mb"] = memory.disk_size_mb(model)


def _log_quantization_artifacts(point: PointRun, report: QuantReport) -> None:
    if report.layers:
        point.log_json(report.layers, "quantized_layers.json")
    if report.notes:
        point.tracker.log_text(point.run_id, "\n".join(report.notes), "quantize_notes.txt")
    for name, content in report.artifacts.items():
        point.log_json(content, name)


def _measure_latency(point: PointRun, model, tokenizer, report: QuantReport) -> None:
    cfg, metrics = point.cfg, point.metrics
    if report.weights == SIMULATED and not cfg.bench.simulated:
        # Dequantized weights in the model's dtype decode exactly as fast as the unquantized model, whose
        # run (the sweep's baseline) measures it: timing them again would report the same speed as theirs.
        with point.phase("generate"):
            point.log_json(sample_generations(model, tokenizer, cfg.bench), "samples.json")
        point.tag({"latency.skipped": "simulated weights decode at the unquantized model's speed (the baseline "
                                      "measures it); bench.simulated=true times them anyway"})
        return
    with point.phase("generate"):
        latencies, latency_errors = measure_latency(model, tokenizer, cfg.bench, point.progress)
    for mode, error in latency_errors.items():
        point.tag({f"latency.{mode}.error": error})
        point.progress.say(f"[yellow]latency mode {mode} failed: {error}[/yellow]")
    cuda = point.device.startswith("cuda")
    for mode, result in latencies.items():
        prefix = "latency." if mode == "eager" else f"latency.{mode}."
        mode_metrics = result.metrics()
        metrics.update({prefix + k: v for k, v in mode_metrics.items()})
        if cuda and "tokens_per_s" in mode_metrics:
            # Decode at batch b streams every weight once per step: bytes x steps/s vs the device bandwidth.
            metrics[prefix + "bandwidth_fraction"] = bandwidth_fraction(
                metrics["memory.decode_read_mb"], mode_metrics["tokens_per_s"] / cfg.bench.batch_size)
    if cuda:
        metrics["device.bandwidth_gbps"] = device_bandwidth_gbps()
    latency = latencies.get("eager") or next(iter(latencies.values()))
    point.log_json(latency.samples, "samples.json")
    point.log_json({"ttft_ms": latency.ttft_ms, "itl_ms": latency.itl_ms, "request_ms": latency.request_ms,
                    "new_tokens": latency.new_tokens}, "latency_samples.json")


def _measure_quality(point: PointRun, model, tokenizer, report: QuantReport) -> None:
    wanted = point.cfg.eval.dtype
    if wanted != "auto" and getattr(torch, wanted) != model.dtype:
        if report.weights == PACKED:
            raise ValueError(f"eval.dtype={wanted!r} cannot apply to a packed model: its kernels fix the dtype "
                             f"({model.dtype}); use eval.dtype=auto")
        model.to(getattr(torch, wanted))  # simulated or unquantized weights are plain tensors: cast them
    point.tag({"eval.dtype": str(model.dtype).replace("torch.", "")})
    with point.phase("eval"):
        quality, raw, items = evaluate(model, tokenizer, point.cfg.eval, point.cache, seed=point.cfg.seed)
    point.metrics.update(quality)
    point.metrics["time.eval_s"] = point.seconds("eval")
    point.log_json(raw, "lm_eval_results.json")
    # Per document / per passage: the report's intervals over seeds and its paired comparisons read these.
    point.log_json(items, ITEMS_ARTIFACT)


def _record_determinism(point: PointRun, report: QuantReport, ops: List[str]) -> None:
    """`deterministic=true` when no op of calibration, quantization or evaluation lacked a deterministic
    implementation and the backend claims none of its own; else false, naming what was not."""
    reasons = list(ops) + ([report.nondeterministic] if report.nondeterministic else [])
    point.tag({"deterministic": str(not reasons).lower()})
    if reasons:
        point.tag({"deterministic.ops": ", ".join(reasons)[:5000]})


def _log_metrics(point: PointRun) -> Dict[str, float]:
    metrics = point.metrics
    for phase, seconds in point.progress.phase_seconds.items():  # time.load_s, time.calibrate_s, time.generate_s ...
        metrics.setdefault(f"time.{phase}_s", seconds)
    metrics.update({f"memory.{k}": v for k, v in point.peaks.peaks.items()})
    metrics["memory.peak_mb"] = point.peaks.overall_peak_mb()
    bad = point.tracker.log_metrics(point.run_id, metrics)
    if bad:
        # NaN/inf are never logged as numbers: the run says which metrics were not finite.
        point.tag({TAG_NONFINITE: ",".join(bad)})
        point.progress.say(f"[yellow]non-finite metrics (not logged): {', '.join(bad)}[/yellow]")
    return metrics


def _record_failure(tracker: Tracker, run_id: str, status: str, log_file: Optional[Path]) -> None:
    exc_type, exc, _ = sys.exc_info()
    try:
        tracker.set_tags(run_id, {"error.class": exc_type.__name__ if exc_type else status,
                                  "error.message": str(exc)[:5000] if exc else status})
        tracker.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
        if log_file and log_file.is_file():
            tracker.log_file(run_id, log_file)
    finally:
        tracker.finish(run_id, status)
