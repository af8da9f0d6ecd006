"""lm-eval's HF model, with the head and the log-softmax run only from the first position a batch scores.

lm-eval runs the model's head and the log-softmax over every position of every batch (the log-softmax in
float32: sweep asks for it, sweep/measure/quality.py), while a LAMBADA passage scores only its last word,
so about nine tenths of that work, and of the float32 copy of the logits it makes, is thrown away.
`ScoredPositionsLM` hands lm-eval the logits from the first position any row of the batch scores; on a
CPU it asks the model for those positions only (transformers' `logits_to_keep`, where the model's forward
takes it). lm-eval already accepts logits shorter or longer than its input (it shifts its slicing by the
difference, which it does for the virtual tokens of prefix tuning). The decoder layers still run over every
position. A log-softmax is row by row, and torch's CPU matmuls compute a row the same way however many rows
the product has, so every score is the same bits as before (tests/test_scored_lm.py checks both against
lm-eval's HFLM, per dtype, on the machine that runs it). On a GPU the head keeps lm-eval's shape: cuBLAS
picks its kernel, and with it the order of a dot product's sum, by the matrix shape.

Which position a row scores from is lm-eval's own arithmetic on its requests (input = the last
max_length tokens of context + continuation, minus the final one; scored = its last len(continuation)
positions). Rows that cannot be matched to a request keep the whole batch's logits.
"""
from __future__ import annotations

import inspect
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
        if not self._first_scored or attn_mask is not None or inps.dim() != 2:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        first = batch_first_scored(inps.tolist(), self._first_scored)
        if first and self.device.type == "cpu" and _takes_logits_to_keep(self.model):
            # The head only over the positions kept; lm-eval's own call (its no_grad and autocast) unchanged.
            keep = inps.shape[1] - first
            handle = self.model.register_forward_pre_hook(
                lambda module, args, kwargs: (args, {**kwargs, "logits_to_keep": keep}), with_kwargs=True)
            try:
                logits = super()._model_call(inps)
            finally:
                handle.remove()
        else:
            logits = super()._model_call(inps)
        if logits.dim() == 3 and logits.shape[1] == inps.shape[1] and first:
            return logits[:, first:]
        return logits


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward names `logits_to_keep` (transformers' causal LMs since 4.50; a wrapped
    forward of *args/**kwargs does not count, since what it passes on is unknown)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
