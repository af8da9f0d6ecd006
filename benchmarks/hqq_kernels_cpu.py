"""hqq 4-bit on CPU: its PyTorch backend against the same layers repacked onto tinygemm's CPU kernel.

The embedded model (SmolLM2-135M, bfloat16), hqq 4-bit g64 (every linear fits tinygemm), once per
`method.kernel`: token perplexity on a WikiText-2 probe (articles 2-3, 4,096 tokens in 1,024-token
windows: prefill, the evaluation's kind of work) with its time, and greedy decode of 32 new tokens
after a warm-up (best of 3). Prints one line per kernel and writes them as CSV.

Usage: python benchmarks/hqq_kernels_cpu.py [OUT.csv]
"""
from __future__ import annotations

import copy
import csv
import sys
import time

import torch

from sweep.config.schema import SweepConfig
from sweep.infra.progress import Progress
from sweep.measure.probe import probe_perplexity, probe_tokens
from sweep.methods import get_method
from sweep.models.loading import load_model

KERNELS = ("pytorch", "tinygemm_int4")
PROMPT = "Explain what quantization does to a neural network."
NEW_TOKENS = 32


def hqq_config(kernel: str) -> SweepConfig:
    """The settings `python -m sweep model.dtype=bfloat16 method=hqq bits=4 group_size=64 method.kernel=KERNEL` runs."""
    cfg = SweepConfig()
    cfg.model.dtype = "bfloat16"
    cfg.bits, cfg.group_size = 4, 64
    cfg.method = {"name": "hqq", "kernel": kernel}
    return cfg


def main(out_path: str | None) -> None:
    base = hqq_config("pytorch")
    model, tokenizer = load_model(base.model, "cpu", base.cache_dir)
    tokens = probe_tokens(tokenizer, [2, 3], 4096)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    rows = []
    for kernel in ("unquantized",) + KERNELS:
        quantized = copy.deepcopy(model)
        if kernel != "unquantized":
            get_method("hqq")(hqq_config(kernel)).quantize(quantized, None, Progress("hqq", enabled=False))
        with torch.no_grad():
            start = time.perf_counter()
            ppl = probe_perplexity(quantized, tokens, 1024)
            probe_s = time.perf_counter() - start
            quantized.generate(**prompt, max_new_tokens=4, do_sample=False)
            decode = []
            for _ in range(3):
                start = time.perf_counter()
                quantized.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                decode.append(time.perf_counter() - start)
        row = {"kernel": kernel, "probe_ppl": round(ppl, 4), "probe_s": round(probe_s, 2),
               "decode_tokens_per_s": round(NEW_TOKENS / min(decode), 2), "threads": torch.get_num_threads()}
        rows.append(row)
        print(row, flush=True)
    if out_path:
        with open(out_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
