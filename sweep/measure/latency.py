"""Generation latency on a fixed prompt set: time to first token, inter-token latency, tokens/s.

Greedy decoding with the KV cache through `generate()`; a streamer timestamps every decode
step as it is produced. Warm-up passes are run first and not counted. On CUDA every timestamp
is taken after a synchronize, so it marks when the token really exists.

Two modes (bench.mode): "eager" is generate() as users call it; on a fast GPU its decode is
bound by Python and kernel launches, not by the weights. "static" uses a static KV cache, which
lets transformers compile the decode step with CUDA graphs, so the step time approaches what
the weights' memory traffic allows. transformers skips that compile for models loaded through a
quantizer it does not mark compileable (GPTQ, AWQ, auto-round, bitsandbytes), whatever kernel runs
them; static mode lifts that gate for its duration (`_compile_gate_lifted`) and records whether
the decode step was compiled and how many graph breaks the kernels caused, so a kernel that does
not compile shows as such instead of as a quietly uncompiled number. At batch b every step yields
b tokens: tokens_per_s counts all of them, itl_ms is the time per step.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from transformers.generation.streamers import BaseStreamer

from sweep.config.schema import BenchConfig


MODES = {"eager": ("eager",), "static": ("static",), "graph": ("graph",), "both": ("eager", "static"),
         "all": ("eager", "static", "graph")}
_BANDWIDTH_GBPS: Dict[int, float] = {}


def device_bandwidth_gbps(device_index: int = 0) -> float:
    """Achievable device-memory bandwidth: a 1 GiB device-to-device copy (read + write), best of 5."""
    if device_index not in _BANDWIDTH_GBPS:
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device=f"cuda:{device_index}")
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _BANDWIDTH_GBPS[device_index] = 2 * n / best / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return _BANDWIDTH_GBPS[device_index]


def bandwidth_fraction(read_mb: float, steps_per_s: float) -> float:
    """Fraction of the memory-bandwidth bound reached by decode: weight bytes read per step
    (`memory.decode_read_mb`) x steps/s / bandwidth."""
    return read_mb * 1024 * 1024 * steps_per_s / (device_bandwidth_gbps() * 1e9)


class _TokenClock(BaseStreamer):
    def __init__(self, sync: bool):
        self.sync = sync
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put() is the prompt itself
            self._prompt_seen = True
            return
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class LatencyResult:
    ttft_ms: List[float] = field(default_factory=list)
    itl_ms: List[float] = field(default_factory=list)
    request_ms: List[float] = field(default_factory=list)
    new_tokens: List[int] = field(default_factory=list)
    samples: List[Dict[str, str]] = field(default_factory=list)
    batch_size: int = 1
    # static mode: whether generate() compiled the decode step, and the graph breaks it hit
    compiled: bool | None = None
    graph_breaks: int | None = None

    def metrics(self) -> Dict[str, float]:
        if not self.request_ms:
            return {}
        extra = {}
        if self.compiled is not None:
            extra = {"compiled": float(self.compiled), "graph_breaks": float(self.graph_breaks or 0)}
        decode_s = sum(r - t for r, t in zip(self.request_ms, self.ttft_ms)) / 1000
        decode_tokens = sum(n - 1 for n in self.new_tokens) * self.batch_size
        return {
            "ttft_ms_p50": _pct(self.ttft_ms, 50),
            "ttft_ms_p90": _pct(self.ttft_ms, 90),
            "itl_ms_p50": _pct(self.itl_ms, 50) if self.itl_ms else float("nan"),
            "itl_ms_p90": _pct(self.itl_ms, 90) if self.itl_ms else float("nan"),
            "request_ms_p50": _pct(self.request_ms, 50),
            # decode throughput: tokens after the first over the time after the first
            "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            # end to end: every generated token over the whole request
            "e2e_tokens_per_s": sum(self.new_tokens) * self.batch_size / (sum(self.request_ms) / 1000),
            **extra,
        }


def _pct(values: List[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _encode(tokenizer, prompt: str, chat_template: bool, device) -> Dict[str, torch.Tensor]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _batch(encodings: List[Dict[str, torch.Tensor]], index: int, batch_size: int, pad_id: int):
    """Prompt `index` and the ones after it (cyclically), left-padded into one batch."""
    if batch_size == 1:
        return encodings[index]
    chosen = [encodings[(index + j) % len(encodings)]["input_ids"][0] for j in range(batch_size)]
    width = max(len(ids) for ids in chosen)
    ids = torch.full((batch_size, width), pad_id, dtype=chosen[0].dtype, device=chosen[0].device)
    mask = torch.zeros((batch_size, width), dtype=torch.long, device=chosen[0].device)
    for row, seq in enumerate(chosen):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def measure_latency(model, tokenizer, cfg: BenchConfig, progress=None):
    """Latency per mode of cfg.mode, and the error of each mode that could not run.

    A compiled (static) mode can fail where eager works (a kernel torch.compile cannot trace):
    that is recorded, not fatal, as long as one mode ran.
    """
    results: Dict[str, LatencyResult] = {}
    errors: Dict[str, str] = {}
    for mode in MODES[cfg.mode]:
        try:
            results[mode] = _measure_mode(model, tokenizer, cfg, mode, progress)
        except Exception as exc:  # noqa: BLE001 - reported per mode; re-raised when no mode works
            if len(MODES[cfg.mode]) == 1:
                raise
            errors[mode] = f"{type(exc).__name__}: {str(exc)[:500]}"
    if not results:
        raise RuntimeError(f"no latency mode could run: {errors}")
    return results, errors


@contextmanager
def _compile_gate_lifted(model):
    """Let generate() compile a model whose quantizer transformers does not mark compileable.

    The flag is per quantizer, not per kernel: it stays off for GPTQ even when the kernel is an
    ordinary aten op. Hiding the quantizer while generating changes nothing else in generate().
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "is_compileable", True):
        yield
        return
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@torch.no_grad()
def _measure_mode(model, tokenizer, cfg: BenchConfig, mode: str, progress=None) -> LatencyResult:
    if mode == "eager":
        return _generate_timed(model, tokenizer, cfg, mode, progress)
    if mode == "graph" and next(model.parameters()).device.type == "cuda":
        # A fresh compile cache per measurement: runs of one multirun process share dynamo's cache,
        # and past its recompile limit dynamo would fall back to eager without a word.
        torch._dynamo.reset()
    breaks = _graph_breaks()
    with _compile_gate_lifted(model):
        if mode == "graph":
            result = _graph_decode_timed(model, tokenizer, cfg, progress)
        else:
            result = _generate_timed(model, tokenizer, cfg, mode, progress)
            # transformers keeps the compiled forward on the model once it has compiled it
            result.compiled = getattr(model, "_compiled_call", None) is not None
    result.graph_breaks = _graph_breaks() - breaks
    return result


def _generate_timed(model, tokenizer, cfg: BenchConfig, mode: str, progress=None) -> LatencyResult:
    device = next(model.parameters()).device
    sync = device.type == "cuda"
    encoded = [_encode(tokenizer, p, cfg.chat_template, device) for p in cfg.prompts]
    if cfg.batch_size > 1:
        tokenizer.padding_side = "left"
    batches = [_batch(encoded, i, cfg.batch_size, tokenizer.pad_token_id) for i in range(len(encoded))]
    gen = dict(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id)
    if mode == "static":
        gen["cache_implementation"] = "static"
    # Static mode compiles on the first calls (one graph per prompt shape): warm every prompt.
    warm = batches if mode == "static" else batches[:1]
    for _ in range(cfg.warmup):
        for enc in warm:
            model.generate(**enc, **gen)
    result = LatencyResult(batch_size=cfg.batch_size)
    runs = [(i, enc) for _ in range(cfg.repeats) for i, enc in enumerate(batches)]
    iterator = progress.track(runs, f"latency ({mode})", total=len(runs)) if progress else runs
    for index, enc in iterator:
        clock = _TokenClock(sync)
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**enc, **gen, streamer=clock)
        if sync:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if not clock.times:
            continue
        result.ttft_ms.append((clock.times[0] - start) * 1000)
        result.itl_ms.extend((b - a) * 1000 for a, b in zip(clock.times, clock.times[1:]))
        result.request_ms.append((end - start) * 1000)
        result.new_tokens.append(len(clock.times))
        if len(result.samples) < len(cfg.prompts):
            completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            result.samples.append({"prompt": cfg.prompts[index], "completion": completion})
    return result


@torch.no_grad()
def sample_generations(model, tokenizer, cfg: BenchConfig) -> List[Dict[str, str]]:
    """One greedy completion per prompt, untimed: what the model says, without measuring how fast."""
    device = next(model.parameters()).device
    samples = []
    for prompt in cfg.prompts:
        enc = _encode(tokenizer, prompt, cfg.chat_template, device)
        out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        samples.append({"prompt": prompt,
                        "completion": tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return samples


def _eos_ids(model) -> List[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _graph_decode_timed(model, tokenizer, cfg: BenchConfig, progress=None) -> LatencyResult:
    """Greedy decode as a serving engine runs it: static KV cache, the decode step compiled and
    replayed as a CUDA graph (torch.compile mode reduce-overhead), the next token chosen on the
    device and fed straight back, no host synchronisation between steps.

    generate() synchronises with the host after every step (stopping criteria, streamer), so its
    step time is the GPU's time plus Python's; this mode leaves only what the weights and kernels
    cost. Same tokens as the other modes: EOS is suppressed until max_new_tokens, as generate()'s
    min_new_tokens does. Step times come from CUDA events (no sync); on CPU the step runs eagerly.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    encoded = [_encode(tokenizer, p, cfg.chat_template, device) for p in cfg.prompts]
    batches = [_batch(encoded, i, cfg.batch_size, tokenizer.pad_token_id) for i in range(len(encoded))]
    # One cache for every prompt (reset between them), so the step compiles once.
    max_len = max(b["input_ids"].shape[1] for b in batches) + cfg.max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    mask = torch.ones(cfg.batch_size, max_len, dtype=torch.long, device=device)  # prompt pads zeroed per request
    eos = torch.tensor(_eos_ids(model), dtype=torch.long, device=device)

    def next_token(logits):
        logits = logits[:, -1, :].float()
        if eos.numel():
            logits = logits.index_fill(-1, eos, float("-inf"))
        return logits.argmax(-1, keepdim=True)

    def decode_step(token, cache_position, position_ids):
        logits = model(input_ids=token, attention_mask=mask, past_key_values=cache, cache_position=cache_position,
                       position_ids=position_ids, use_cache=True).logits
        return next_token(logits)

    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) if cuda else decode_step

    def request(enc):
        ids = enc["input_ids"]
        width = ids.shape[1]
        prompt_mask = enc.get("attention_mask", torch.ones_like(ids))
        cache.reset()
        mask.fill_(1)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        token = next_token(model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 cache_position=torch.arange(width, device=device), position_ids=positions,
                                 use_cache=True).logits)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter()
        tokens = [token]
        cache_position = torch.tensor([width], device=device)
        position_ids = positions[:, -1:] + 1
        marks = []
        for _ in range(cfg.max_new_tokens - 1):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            token = step(token, cache_position, position_ids).clone()
            tokens.append(token)
            cache_position += 1
            position_ids += 1
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                marks.append(time.perf_counter())
        if cuda:
            torch.cuda.synchronize()
            steps_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        else:
            steps_ms = [(b - a) * 1000 for a, b in zip(marks, marks[1:])]
        end = time.perf_counter()
        return torch.cat(tokens, dim=1), (first - start) * 1000, steps_ms, (end - start) * 1000

    for _ in range(max(cfg.warmup, 1)):  # compiles and records the graph; never timed
        request(batches[0])
    result = LatencyResult(batch_size=cfg.batch_size, compiled=cuda)
    runs = [(i, enc) for _ in range(cfg.repeats) for i, enc in enumerate(batches)]
    iterator = progress.track(runs, "latency (graph)", total=len(runs)) if progress else runs
    for index, enc in iterator:
        out, ttft_ms, steps_ms, request_ms = request(enc)
        result.ttft_ms.append(ttft_ms)
        result.itl_ms.extend(steps_ms)
        result.request_ms.append(request_ms)
        result.new_tokens.append(out.shape[1])
        if len(result.samples) < len(cfg.prompts):
            result.samples.append({"prompt": cfg.prompts[index],
                                   "completion": tokenizer.decode(out[0], skip_special_tokens=True)})
    return result
