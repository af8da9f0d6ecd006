"""Computing each finished part of a decoder layer once during sequential calibration.

A true-sequential layer is run once per group of linears and once more for its outputs, and every
run recomputes the parts whose linears are already quantized: with their final weights and the same
inputs, so the same bits each time. `OutputReplay` records a finished module's outputs (a linear, or a
whole attention block once all its linears are done) the first time it runs with its final weights and
returns them on the layer's later runs instead of computing them again. On the embedded model each
linear's product is then computed once per layer instead of about 2.5 times, attention twice instead
of four times.

Exactness is kept by construction and checked: a replayed output is the very object the module
returned for the same call (same sample, same position in the layer's call order); if anything changed
one of its tensors in place since (a version counter moved), or the call's first input does not have
the recorded shape, the module computes for real.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

# Recorded outputs held at once (one layer's linears, all calibration samples). Above this the layer
# runs without replay: the same result at the old cost, rather than holding a large model's
# activations several times over.
MAX_REPLAY_BYTES = 1 << 30


def replay_bytes(linears: Iterable[nn.Linear], tokens: int, element_size: int) -> int:
    """Memory the outputs of these linears take for `tokens` calibration tokens."""
    return sum(m.out_features for m in linears) * tokens * element_size


def finished_modules(layer: nn.Module, targets: Set[nn.Module], finished: Set[nn.Module]) -> List[nn.Module]:
    """Submodules of `layer` (not the layer itself) holding at least one target linear, all of them
    finished: their outputs no longer change within this layer's calibration."""
    found = []
    for module in layer.modules():
        if module is layer:
            continue
        inside = [m for m in module.modules() if m in targets]
        if inside and all(m in finished for m in inside):
            found.append(module)
    return found


def _tensors(output: Any) -> Optional[List[torch.Tensor]]:
    """The tensors of a module's output (a tensor, or a tuple/list of tensors and Nones); None for
    anything else, which is then not recorded."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return [o for o in output if o is not None]
    return None


def _first_input_shape(args, kwargs) -> Optional[torch.Size]:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape
    return None


class OutputReplay:
    """Per decoder layer: `with replay.running(modules):` runs the layer with each of `modules` (parts
    whose weights will not change again) replayed where recorded and recorded where not."""

    def __init__(self) -> None:
        self._recorded: Dict[nn.Module, List[Tuple[Any, Optional[List[int]], Optional[torch.Size]]]] = {}
        self.replayed = 0   # calls answered from the record (for tests and profiling)
        self.computed = 0   # calls of recorded-or-replayed modules that computed

    @contextmanager
    def running(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        handles, patched = [], []
        try:
            for module in modules:
                if self._recorded.get(module):
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = self._replayer(self._recorded[module], module.forward)
                else:
                    self._recorded[module] = []
                    handles.append(module.register_forward_hook(self._recorder, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, own_forward in patched:
                # Put back exactly what was there: an instance-level forward (accelerate's hooks set
                # one) or none, so that the class's forward applies again.
                if own_forward is None:
                    del module.forward
                else:
                    module.forward = own_forward

    def clear(self) -> None:
        self._recorded.clear()

    def _recorder(self, module, args, kwargs, output) -> None:
        self.computed += 1
        tensors = _tensors(output)
        # An output of another kind is kept as a placeholder, so later calls stay aligned, never replayed.
        versions = [t._version for t in tensors] if tensors is not None else None
        self._recorded[module].append((output, versions, _first_input_shape(args, kwargs)))

    def _replayer(self, records, compute):
        calls = iter(records)

        def forward(*args, **kwargs):
            record = next(calls, None)
            if record is not None:
                output, versions, shape = record
                if (versions is not None and [t._version for t in _tensors(output)] == versions
                        and _first_input_shape(args, kwargs) == shape):
                    self.replayed += 1
                    return output
            self.computed += 1
            return compute(*args, **kwargs)

        return forward
