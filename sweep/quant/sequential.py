"""Layer-by-layer calibration for methods that solve each linear from its inputs' Hessian (GPTQ, AQLM).

Block by block through the model: each decoder layer sees the outputs of the already-quantized
layers before it (sequential), and within a layer the linears come in execution order
(true-sequential: q/k/v, then o, then gate/up, then down), each group's Hessian accumulated on
the outputs of the groups the caller has already quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch
from torch import nn

from sweep.quant.gptq_solver import HessianAccumulator
from sweep.quant.layers import (LayerInputs, capture_first_layer_inputs, decoder_layers, run_layer, run_layer_until,
                                sequential_groups)


@dataclass
class HessianGroup:
    linears: Dict[str, nn.Linear]   # full module name → linear; all of them read the input H is of
    H: torch.Tensor                 # 2/n Σ x xᵀ over their calibration inputs, float32


class SequentialCalibration:
    """Iterate `groups()`, quantizing each group's linears before asking for the next; afterwards
    `inputs` holds what the last decoder layer output (for a head quantized on the same data)."""

    def __init__(self, model: nn.Module, calibration: List[torch.Tensor], linears: Dict[str, nn.Linear],
                 true_sequential: bool = True, batch_tokens: int = 0):
        self.model = model
        self.linears = linears
        self.true_sequential = true_sequential
        self.inputs: LayerInputs = capture_first_layer_inputs(model, calibration, batch_tokens)

    @torch.no_grad()
    def groups(self, progress, label: str) -> Iterator[HessianGroup]:
        layers = decoder_layers(self.model)
        prefix = next(n for n, m in self.model.named_modules() if m is layers)
        for index in progress.track(range(len(layers)), label, total=len(layers)):
            layer, start = layers[index], f"{prefix}.{index}."
            linears = {n[len(start):]: m for n, m in self.linears.items() if n.startswith(start)}
            groups = sequential_groups(layer, self.inputs, linears) if self.true_sequential else [list(linears)]
            for group in groups:
                # A true-sequential group's linears receive one and the same tensor (that is how they
                # were grouped), so they share one Hessian: accumulated once, from the first of them.
                owners = {n: group[0] if self.true_sequential else n for n in group}
                hessians = {o: HessianAccumulator(linears[o].in_features, linears[o].weight.device)
                            for o in set(owners.values())}
                handles = [linears[o].register_forward_pre_hook(lambda mod, args, o=o: hessians[o].add(args[0]))
                           for o in hessians]
                try:
                    run_layer_until(layer, self.inputs, [linears[n] for n in group])
                finally:
                    for h in handles:
                        h.remove()
                for owner, hessian in hessians.items():
                    members = [n for n in group if owners[n] == owner]
                    yield HessianGroup({start + n: linears[n] for n in members}, hessian.H)
                del hessians
            # The next layer calibrates on what this quantized layer really outputs.
            self.inputs.hidden = run_layer(layer, self.inputs)
