"""Self-generated calibration text: the unquantized model writes the windows it is calibrated on.

Williams, Chrysostomou & Aletras, "Self-calibration for Language Model Quantization and Pruning"
(NAACL 2025) sample calibration data from the model itself, starting from its BOS token, and find it
competitive with real text and often better: it follows the model's own training distribution
rather than whichever corpus is at hand. Here each of the `nsamples` windows starts from one of the
configured openings (BOS alone by default; a chat-templated user message for instruct models that
want one) and is sampled, with temperature and top-p, until it is exactly `seqlen` tokens long
(end-of-sequence is suppressed until then). Generation is batched, runs on the model's device, and
is seeded: the same model, settings and seed give the same windows (on one machine and software).
The windows are token ids, so nothing is decoded and re-tokenized.
"""
from __future__ import annotations

from typing import List

import torch

from sweep.config.schema import SelfGenerationConfig


def start_ids(tokenizer, gen: SelfGenerationConfig) -> List[List[int]]:
    """The token ids each sample starts from (one list per opening)."""
    if gen.chat_prompt is not None:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": gen.chat_prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [list(ids)]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = []
    for opening in gen.openings:
        text_ids = tokenizer(opening, add_special_tokens=False).input_ids if opening else []
        starts.append([bos] + list(text_ids))
    return starts


@torch.no_grad()
def generate_windows(model, tokenizer, nsamples: int, seqlen: int, gen: SelfGenerationConfig,
                     seed: int) -> torch.Tensor:
    """`nsamples` sampled sequences of exactly `seqlen` tokens, shape (nsamples, seqlen), on the CPU."""
    device = next(model.parameters()).device
    starts = start_ids(tokenizer, gen)
    too_long = [s for s in starts if len(s) >= seqlen]
    if too_long:
        raise ValueError(f"calibration.seqlen={seqlen} leaves no room to generate after a start of "
                         f"{len(too_long[0])} tokens; use a longer seqlen or a shorter opening")
    rows: List[torch.Tensor] = []
    # Sample k uses start k mod len(starts); samples of one start share batches (equal lengths, no padding).
    by_start = {i: [k for k in range(nsamples) if k % len(starts) == i] for i in range(len(starts))}
    for index, samples in by_start.items():
        prompt = torch.tensor([starts[index]], dtype=torch.long, device=device)
        for first in range(0, len(samples), gen.batch_size):
            batch = len(samples[first:first + gen.batch_size])
            torch.manual_seed(seed * 1_000_003 + index * 10_007 + first)   # every batch its own seed
            new = seqlen - prompt.shape[1]
            out = model.generate(prompt.expand(batch, -1), attention_mask=torch.ones_like(prompt).expand(batch, -1),
                                 do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
                                 max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            rows.extend(out.cpu())
    order = [k for samples in by_start.values() for k in samples]
    windows = torch.stack(rows)[torch.argsort(torch.tensor(order))]
    return windows
