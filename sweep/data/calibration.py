"""Calibration samples: `nsamples` windows of `seqlen` tokens, seeded, from a text source or from the model.

Sources: the LAMBADA *development* passages (`lambada_dev`, disjoint from the LAMBADA test set,
unrelated to WikiText), text the unquantized model writes itself (`self_generated`,
sweep/data/self_generated.py), a local .txt/.jsonl file, or a Hub dataset. Never an evaluation test
split: validation refuses the files sweep evaluates on. Samples are cached with a checksum, keyed by
everything that makes them (`cached_samples`), so a grid builds them once per seed and size.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sweep.config.schema import CalibrationConfig
from sweep.data import self_generated
from sweep.data.vendored import CHECKSUMS, data_file
from sweep.infra.cache import cached_tensor, sha256_file


def describe(cfg: CalibrationConfig) -> str:
    """The calibration source as it goes into the run's tags."""
    if cfg.source == "lambada_dev":
        return "lambada_dev (sweep/data/lambada.development.plain.txt, detokenized)"
    if cfg.source == "self_generated":
        gen = cfg.generation
        start = f"chat prompt {gen.chat_prompt!r}" if gen.chat_prompt is not None else \
            "openings " + ", ".join(repr(o) if o else "BOS" for o in gen.openings)
        return f"self_generated (temperature {gen.temperature}, top-p {gen.top_p}, {start})"
    return cfg.source


# The LAMBADA development file is lower-cased, tokenized text (`` he said , '' ...). A cased model
# sees nothing like it in use, and GPTQ fitted to it overfits to that style: on SmolLM2-135M at
# 3 bits it came out worse than RTN. Undoing the tokenization and restoring sentence case makes
# it ordinary prose again (names stay lower-case).
_DETOKENIZE = [
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"\s+([.,;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[$])\s+"), r"\1"),
    (re.compile(r"\s+-\s+"), "-"),
    (re.compile(r"\bi\b"), "I"),
]
_SENTENCE_START = re.compile(r'(^|[.!?]\s+"?|^"|\s"(?=\w))([a-z])')


def detokenize(line: str) -> str:
    """Lower-cased PTB-tokenized text → readable, sentence-cased prose."""
    for pattern, repl in _DETOKENIZE:
        line = pattern.sub(repl, line)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), line.strip())


def load_texts(cfg: CalibrationConfig) -> List[str]:
    if cfg.source == "lambada_dev":
        lines = data_file("lambada.development.plain.txt").read_text(encoding="utf-8").splitlines()
        return [detokenize(line) for line in lines]
    if cfg.source.startswith("hub:"):
        from datasets import load_dataset

        spec = cfg.source[4:].split(":")
        ds = load_dataset(spec[0], spec[1] if len(spec) > 1 else None, split="train")
        return [row[cfg.text_field] for row in ds]
    path = Path(cfg.source).expanduser()
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)[cfg.text_field] for line in f if line.strip()]
    return path.read_text(encoding="utf-8").splitlines()


def build_samples(tokenizer, cfg: CalibrationConfig) -> List[torch.Tensor]:
    """Token windows of shape (1, seqlen), drawn from the concatenated source text."""
    texts = [t for t in load_texts(cfg) if t.strip()]
    rng = random.Random(cfg.seed)
    # Tokenize only as much text as the windows can need (a few times over), not the whole corpus.
    rng.shuffle(texts)
    needed = cfg.nsamples * cfg.seqlen * 4
    chunk, count = [], 0
    for t in texts:
        chunk.append(t)
        count += len(t.split())
        if count >= needed:
            break
    ids = tokenizer("\n\n".join(chunk), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= cfg.seqlen:
        raise ValueError(f"calibration.source {cfg.source!r} has only {ids.numel()} tokens; "
                         f"calibration.seqlen={cfg.seqlen} needs more")
    starts = [rng.randrange(0, ids.numel() - cfg.seqlen) for _ in range(cfg.nsamples)]
    return [ids[s:s + cfg.seqlen].unsqueeze(0) for s in starts]


def cached_samples(tokenizer, cfg: CalibrationConfig, cache_dir: Path, model=None,
                   model_fingerprint: Optional[Dict[str, Any]] = None) -> List[torch.Tensor]:
    """The calibration windows, built once per (source, settings, tokenizer[, model]) and then read back.

    `model` and `model_fingerprint` (what identifies its weights, dtype and device) are needed for
    `self_generated`: the model writes the samples, so they are cached per model."""
    inputs = {"calibration": asdict(cfg), "tokenizer": tokenizer_fingerprint(tokenizer),
              "source": source_fingerprint(cfg),
              # Any change to how samples are drawn invalidates old entries.
              "code": [sha256_file(Path(__file__)), sha256_file(Path(self_generated.__file__))]}
    if cfg.source == "self_generated":
        if model is None or model_fingerprint is None:
            raise ValueError("calibration.source=self_generated needs the model that writes the samples")
        inputs["model"] = model_fingerprint

        def build() -> torch.Tensor:
            return self_generated.generate_windows(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.generation,
                                                   cfg.seed)
    else:
        def build() -> torch.Tensor:
            return torch.cat(build_samples(tokenizer, cfg), dim=0)
    windows = cached_tensor(cache_dir, "calibration", inputs, build)
    return [row.unsqueeze(0) for row in windows]


def fingerprint(samples: List[torch.Tensor]) -> str:
    """A short hash of the windows themselves: two runs calibrated on the same tokens share it."""
    return hashlib.sha256(torch.cat(samples).numpy().tobytes()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> Dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def source_fingerprint(cfg: CalibrationConfig) -> str:
    if cfg.source == "lambada_dev":
        return CHECKSUMS["lambada.development.plain.txt"]
    if cfg.source == "self_generated":
        return "self_generated"  # the model's fingerprint goes into the key beside it
    if cfg.source.startswith("hub:"):
        return cfg.source  # a Hub dataset is identified by its name only
    return sha256_file(Path(cfg.source).expanduser())
