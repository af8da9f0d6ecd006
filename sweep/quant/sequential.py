"""Layer-by-layer calibration for methods that solve each linear from its inputs' Hessian (GPTQ, AQLM).

Block by block through the model: each decoder layer sees the outputs of the already-quantized
layers before it (sequential), and within a layer the linears come in execution order
(true-sequential: q/k/v, then o, then gate/up, then down), each group's Hessian accumulated on
the outputs of the groups the caller has already quantized. Those groups' outputs, and the layer's
norms, are computed once per layer and replayed on its later passes (sweep/quant/replay.py).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from sweep.quant.gptq_solver import HessianAccumulator, RowBuffer
from sweep.quant.layers import (LayerInputs, capture_first_layer_inputs, decoder_layers, run_layer, run_layer_until,
                                sequential_groups)
from sweep.quant.replay import MAX_REPLAY_BYTES, OutputReplay, finished_modules, replay_bytes, untargeted_children


@dataclass
class HessianGroup:
    linears: Dict[str, nn.Linear]   # full module name → linear; all of them read the input H is of
    H: torch.Tensor                 # 2/n Σ x xᵀ over their calibration inputs, float32


class SequentialCalibration:
    """Iterate `groups()`, quantizing each group's linears before asking for the next; afterwards
    `inputs` holds what the last decoder layer output (for a head quantized on the same data)."""

    def __init__(self, model: nn.Module, calibration: List[torch.Tensor], linears: Dict[str, nn.Linear],
                 true_sequential: bool = True, batch_tokens: int = 0, replay: bool = True):
        self.model = model
        self.linears = linears
        self.true_sequential = true_sequential
        self.inputs: LayerInputs = capture_first_layer_inputs(model, calibration, batch_tokens)
        # Replay pays with true-sequential groups, where each pass runs the groups solved before it;
        # with one group per layer nothing is finished before the output pass.
        self.replay = OutputReplay() if replay and true_sequential else None
        # One per accumulator of a group: the i-th accumulator of every group gathers its rows in the i-th buffer.
        self._row_buffers: List[RowBuffer] = []

    @torch.no_grad()
    def groups(self, progress, label: str) -> Iterator[HessianGroup]:
        layers = decoder_layers(self.model)
        prefix = next(n for n, m in self.model.named_modules() if m is layers)
        for index in progress.track(range(len(layers)), label, total=len(layers)):
            layer, start = layers[index], f"{prefix}.{index}."
            linears = {n[len(start):]: m for n, m in self.linears.items() if n.startswith(start)}
            groups = sequential_groups(layer, self.inputs, linears) if self.true_sequential else [list(linears)]
            replay = self._replay_for(layer, linears)
            targets, finished = set(linears.values()), set()   # finished: linears of the groups already solved
            for group in groups:
                # A true-sequential group's linears receive one and the same tensor (that is how they
                # were grouped), so they share one Hessian: accumulated once, from the first of them,
                # and the layer can stop as soon as that one's input arrives.
                owners = {n: group[0] if self.true_sequential else n for n in group}
                hessians = {o: HessianAccumulator(linears[o].in_features, linears[o].weight.device, self._row_buffer(i))
                            for i, o in enumerate(dict.fromkeys(owners.values()))}
                handles = [linears[o].register_forward_pre_hook(lambda mod, args, o=o: hessians[o].add(args[0]))
                           for o in hessians]
                try:
                    with _replaying(replay, layer, targets, finished):
                        run_layer_until(layer, self.inputs, [linears[o] for o in hessians])
                finally:
                    for h in handles:
                        h.remove()
                for owner, hessian in hessians.items():
                    members = [n for n in group if owners[n] == owner]
                    yield HessianGroup({start + n: linears[n] for n in members}, hessian.H)
                del hessians
                finished.update(linears[n] for n in group)
            # The next layer calibrates on what this quantized layer really outputs.
            with _replaying(replay, layer, targets, finished):
                self.inputs.hidden = run_layer(layer, self.inputs)
            if replay:
                replay.clear()

    def _row_buffer(self, index: int) -> RowBuffer:
        while len(self._row_buffers) <= index:
            self._row_buffers.append(RowBuffer())
        return self._row_buffers[index]

    def _replay_for(self, layer: nn.Module, linears: Dict[str, nn.Linear]) -> Optional[OutputReplay]:
        if self.replay is None or not linears:
            return None
        sample = self.inputs.hidden[0]
        tokens = sum(h.numel() // h.shape[-1] for h in self.inputs.hidden)
        norms = len(untargeted_children(layer, set(linears.values())))
        if replay_bytes(linears.values(), tokens, sample.element_size(), sample.shape[-1], norms) > MAX_REPLAY_BYTES:
            return None
        return self.replay


def _replaying(replay: Optional[OutputReplay], layer: nn.Module, targets: set, finished: set):
    """A pass through `layer` with its finished parts and its norms replayed (or plain, without replay)."""
    if replay is None:
        return nullcontext()
    parts = finished_modules(layer, targets, finished) + untargeted_children(layer, targets)
    return replay.running(layer, parts, unfinished=targets - finished)
