"""Generation latency on a fixed prompt set: time to first token, inter-token latency, tokens/s.

Greedy decoding with the KV cache through `generate()`; a streamer timestamps every token as
it is produced. Warm-up passes are run first and not counted. On CUDA every timestamp is
taken after a synchronize, so it marks when the token really exists.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from transformers.generation.streamers import BaseStreamer

from sweep.config import BenchConfig


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

    def metrics(self) -> Dict[str, float]:
        if not self.request_ms:
            return {}
        decode_s = sum(r - t for r, t in zip(self.request_ms, self.ttft_ms)) / 1000
        decode_tokens = sum(n - 1 for n in self.new_tokens)
        return {
            "ttft_ms_p50": _pct(self.ttft_ms, 50),
            "ttft_ms_p90": _pct(self.ttft_ms, 90),
            "itl_ms_p50": _pct(self.itl_ms, 50) if self.itl_ms else float("nan"),
            "itl_ms_p90": _pct(self.itl_ms, 90) if self.itl_ms else float("nan"),
            "request_ms_p50": _pct(self.request_ms, 50),
            # decode throughput: tokens after the first over the time after the first
            "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            # end to end: every generated token over the whole request
            "e2e_tokens_per_s": sum(self.new_tokens) / (sum(self.request_ms) / 1000),
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


@torch.no_grad()
def measure_latency(model, tokenizer, cfg: BenchConfig, progress=None) -> LatencyResult:
    device = next(model.parameters()).device
    sync = device.type == "cuda"
    encoded = [_encode(tokenizer, p, cfg.chat_template, device) for p in cfg.prompts]
    gen = dict(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id)
    for _ in range(cfg.warmup):
        model.generate(**encoded[0], **gen)
    result = LatencyResult()
    runs = [(i, enc) for _ in range(cfg.repeats) for i, enc in enumerate(encoded)]
    iterator = progress.track(runs, "latency", total=len(runs)) if progress else runs
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
