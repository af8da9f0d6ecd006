"""A cheap perplexity probe: token-level perplexity of the model on a fixed slice of WikiText-2.

Much cheaper than lm-eval's rolling word perplexity (no harness set-up, a fixed number of
tokens in a few non-overlapping windows), and deterministic, so that many nearly identical
models (one per layer group, in the sensitivity sweep) can be compared with each other. Its
numbers are not comparable with `wikitext.word_perplexity`: they are per token, not per word.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sweep.data.vendored import wikitext_documents


def probe_tokens(tokenizer, docs: Sequence[int], max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the given WikiText-2 test articles, concatenated (1-D)."""
    articles = wikitext_documents()
    bad = [d for d in docs if not 0 <= d < len(articles)]
    if bad:
        raise ValueError(f"probe documents {bad} do not exist: WikiText-2 has articles 0..{len(articles) - 1}")
    text = "".join(articles[d] for d in docs)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:max_tokens]


@torch.no_grad()
def probe_perplexity(model, tokens: torch.Tensor, seqlen: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `seqlen` tokens (the last may be shorter)."""
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    for start in range(0, len(tokens), seqlen):
        window = tokens[start:start + seqlen].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(window, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_count += window.shape[1] - 1
    return math.exp(total_nll / total_count)
