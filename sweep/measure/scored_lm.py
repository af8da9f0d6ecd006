"""lm-eval's HF model, with the log-softmax taken only from the first position a batch scores.

lm-eval runs the log-softmax over every position of every batch (in float32: sweep asks for it,
sweep/measure/quality.py), while a LAMBADA passage scores only its last word, so about nine tenths of that
work, and of the float32 copy of the logits it makes, is thrown away. `ScoredPositionsLM` hands lm-eval
the logits from the first position any row of the batch scores. lm-eval already accepts logits shorter
or longer than its input (it shifts its slicing by the difference, which it does for the virtual tokens
of prefix tuning), and a log-softmax is computed row by row, so every score is the same bits as before:
the model and its head still run over every position, only the discarded rows are not normalised.

Which position a row scores from is lm-eval's own arithmetic on its requests (input = the last
max_length tokens of context + continuation, minus the final one; scored = its last len(continuation)
positions). Rows that cannot be matched to a request keep the whole batch's logits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.models.huggingface import HFLM


def first_scored_positions(requests: Sequence[Tuple[object, List[int], List[int]]],
                           max_length: int) -> Dict[Tuple[int, ...], int]:
    """Model input (as lm-eval builds it for a causal model) → first position whose logits it scores."""
    table: Dict[Tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        tokens = (list(context) + list(continuation))[-(max_length + 1):][:-1]
        first = max(len(tokens) - len(continuation), 0)
        key = tuple(tokens)
        table[key] = min(first, table.get(key, first))
    return table


def batch_first_scored(rows: List[List[int]], table: Dict[Tuple[int, ...], int]) -> int:
    """The first position any of these right-padded rows scores (0 when a row matches no request).

    Padding is zeros, and a row's own tokens may end in zeros too, so every length from the full row
    down through its trailing zeros is tried and the smallest first position found is kept: never later
    than the row's true one."""
    first = None
    for row in rows:
        found: Optional[int] = None
        length = len(row)
        while length > 0:
            start = table.get(tuple(row[:length]))
            if start is not None:
                found = start if found is None else min(found, start)
            if row[length - 1] != 0:
                break
            length -= 1
        if found is None:
            return 0
        first = found if first is None else min(first, found)
    return first or 0


class ScoredPositionsLM(HFLM):
    _first_scored: Optional[Dict[Tuple[int, ...], int]] = None

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        self._first_scored = first_scored_positions(requests, self.max_length)
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._first_scored = None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if not self._first_scored or logits.dim() != 3 or logits.shape[1] != inps.shape[1]:
            return logits
        first = batch_first_scored(inps.tolist(), self._first_scored)
        return logits[:, first:] if first else logits
