"""Finding what to quantize in a causal LM, and running calibration data through it block by block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: `model.model.layers` for Llama/Qwen/Mistral-style models,
    else the longest ModuleList in the model."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(lists, key=len)


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> Dict[str, nn.Linear]:
    """Linear layers inside the decoder blocks (embeddings are never Linear), plus lm_head if asked."""
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    found = {
        name: mod for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.startswith(prefix + ".")
    }
    if include_lm_head:
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            untie_lm_head(model)
            found["lm_head"] = model.get_output_embeddings()
    return found


def untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight, so quantizing it leaves the input embeddings as they were."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


@dataclass
class LayerInputs:
    """The hidden states entering one decoder layer for each calibration sample, plus the
    keyword arguments the model passes to its layers (masks, rotary embeddings, positions)."""

    hidden: List[torch.Tensor]
    kwargs: List[Dict[str, Any]]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, samples: List[torch.Tensor], batch_tokens: int = 0) -> LayerInputs:
    """Run the samples through the model up to the first decoder layer and keep what it receives.

    With batch_tokens > 0, consecutive samples of equal length go through as one batch of up to that
    many tokens (each entry of the result is then a batch): the same per-sample arithmetic in larger
    matrix products, which a CPU runs several times faster than one sample at a time."""
    layers = decoder_layers(model)
    first = layers[0]
    captured = LayerInputs(hidden=[], kwargs=[])

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.kwargs.append(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batched_samples(samples, batch_tokens):
            try:
                model(ids.to(_device_of(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def batched_samples(samples: List[torch.Tensor], batch_tokens: int) -> List[torch.Tensor]:
    """Samples (1 × length each) stacked into batches of consecutive equal-length samples, each of at most
    batch_tokens tokens (at least one sample); batch_tokens <= 0 keeps one sample per batch."""
    batches: List[List[torch.Tensor]] = []
    for ids in samples:
        last = batches[-1] if batches else None
        if (last is not None and batch_tokens > 0 and ids.shape[1:] == last[0].shape[1:]
                and (len(last) + 1) * ids.shape[-1] <= batch_tokens):
            last.append(ids)
        else:
            batches.append([ids])
    return [torch.cat(batch) if len(batch) > 1 else batch[0] for batch in batches]


def run_layer(layer: nn.Module, inputs: LayerInputs) -> List[torch.Tensor]:
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def run_layer_until(layer: nn.Module, inputs: LayerInputs, modules: List[nn.Module]) -> None:
    """Run each sample through `layer` only until every one of `modules` has received its input, then stop.

    For calibration hooks (forward pre-hooks registered before this call, e.g. Hessian accumulators)
    the rest of the layer is wasted work: q/k/v need only the input norm, o_proj the attention, the MLP
    projections everything before them. Stopping there does the same arithmetic for what is kept, and
    less than half the work of full passes over a true-sequential layer."""
    pending: set = set()

    def arrived(module, args):
        pending.discard(id(module))
        if not pending:
            raise _Stop

    handles = [m.register_forward_pre_hook(arrived) for m in modules]
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            pending.update(id(m) for m in modules)
            try:
                layer(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def sequential_groups(layer: nn.Module, inputs: LayerInputs, linears: Dict[str, nn.Linear]) -> List[List[str]]:
    """The layer's linears in the order they run, grouped by shared input (q/k/v, gate/up),
    found by watching one forward pass, so no per-architecture table is needed.

    Linears share an input when they receive the same tensor object. The hook keeps every input
    alive until the grouping is done: comparing addresses of tensors already freed let the
    allocator's reuse of a freed block merge o_proj into q/k/v's group in some processes and not
    others, so GPTQ's true-sequential order, and its result, changed from run to run."""
    order: List[Tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(lambda m, args, name=name: order.append((name, args[0]))))
    try:
        with torch.no_grad():  # one sample is enough to see the order (a batched entry holds many)
            layer(inputs.hidden[0][:1], **inputs.kwargs[0])
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    seen = set()
    last_input = None
    for name, tensor in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    missing = [n for n in linears if n not in seen]
    if missing:  # linears the forward pass did not reach (e.g. unused experts) go last
        groups.append(missing)
    return groups


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def iter_layers(model: nn.Module) -> Iterator[Tuple[int, nn.Module]]:
    yield from enumerate(decoder_layers(model))


def decoder_checksum(model: nn.Module) -> str:
    """sha256 of every tensor in the decoder layers and lm_head, in name order: equal checksums mean
    bit-identical quantized weights, whatever format (simulated or packed) holds them."""
    import hashlib

    digest = hashlib.sha256()
    layers = decoder_layers(model)
    tensors = {f"layers.{k}": v for k, v in layers.state_dict().items()}
    head = model.get_output_embeddings()
    if head is not None:
        tensors.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()
