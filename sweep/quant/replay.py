"""Computing each finished part of a decoder layer once during sequential calibration.

A true-sequential layer is run once per group of linears and once more for its outputs, and every
run recomputes the parts whose linears are already quantized: with their final weights and the same
inputs, so the same bits each time. `OutputReplay` records a finished module's outputs (a linear, or a
whole attention block once all its linears are done) the first time it runs with its final weights and
returns them on the layer's later runs instead of computing them again. On the embedded model each
linear's product is then computed once per layer instead of about 2.5 times, attention twice instead
of four times.

The layer's other parts with weights (its norms: `untargeted_children`) hold no linear being quantized,
so their outputs are final from the first pass that computes them, as long as nothing not yet quantized
ran before them in that pass: each run stops where the next group's first linear starts, so on a layer
whose control flow does not depend on the data that is always so, and `running` checks it per sample
(a linear not yet quantized starting marks the rest of that sample's run as not to be recorded). The
input norm then runs once per sample per layer instead of five times, the post-attention norm once
instead of three times.

Exactness is kept by construction and checked: a replayed output is the very object the module
returned for the same call (same sample, same position among that module's calls on that sample); if
anything changed one of its tensors in place since (a version counter moved), or the call's first input
does not have the recorded shape, the module computes for real. Weights of recorded modules do not change
within a layer's calibration (the methods write only the linears they quantize, each before it is
recorded).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set

import torch
from torch import nn

# Recorded outputs held at once (one layer's linears, all calibration samples). Above this the layer
# runs without replay: the same result at the old cost, rather than holding a large model's
# activations several times over.
MAX_REPLAY_BYTES = 1 << 30


def replay_bytes(linears: Iterable[nn.Linear], tokens: int, element_size: int, hidden_size: int = 0,
                 untargeted: int = 0) -> int:
    """Memory the outputs of these linears, and of `untargeted` hidden-sized parts (the norms), take for
    `tokens` calibration tokens."""
    return (sum(m.out_features for m in linears) + untargeted * hidden_size) * tokens * element_size


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


def untargeted_children(layer: nn.Module, targets: Set[nn.Module]) -> List[nn.Module]:
    """The layer's direct parts that have weights but hold no target linear (its norms). Only direct
    parts: the layer itself always computes, so each of their calls on a sample is the same call, in
    the same order, on every pass."""
    return [child for child in layer.children()
            if next(child.parameters(), None) is not None and not any(m in targets for m in child.modules())]


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


class _Record(NamedTuple):
    output: Any
    versions: Optional[List[int]]       # None: never replayed (an output of another kind, or not final)
    shape: Optional[torch.Size]


class OutputReplay:
    """Per decoder layer: `with replay.running(layer, modules, unfinished):` runs the layer (once per
    calibration sample, the samples in the same order on every pass) with each of `modules` (parts whose
    outputs will not change again) replayed where recorded and recorded where not. No record is taken on a
    sample after one of `unfinished` (linears not yet quantized) has started on it.

    A call is matched to its record by sample and by its position among the module's calls on that sample.
    A replayed call skips the calls it would have made inside; so that a later call of the same module
    cannot offset its parts' positions, the parts of a replayed module compute for the rest of the sample."""

    def __init__(self) -> None:
        # module → sample index → its calls on that sample, in order
        self._recorded: Dict[nn.Module, Dict[int, List[_Record]]] = {}
        self.replayed = 0   # calls answered from the record (for tests and profiling)
        self.computed = 0   # calls of recorded-or-replayed modules that computed
        self._sample = -1
        self._calls: Dict[nn.Module, int] = {}
        self._final = True  # no linear of `unfinished` has started on this sample yet
        self._inside: Dict[nn.Module, List[nn.Module]] = {}   # module → the other `modules` it contains
        self._unmatched: Set[nn.Module] = set()   # parts of a module replayed on this sample: computed

    @contextmanager
    def running(self, layer: nn.Module, modules: Iterable[nn.Module],
                unfinished: Iterable[nn.Module] = ()) -> Iterator[None]:
        self._sample = -1
        handles = [layer.register_forward_pre_hook(self._next_sample)]
        handles += [m.register_forward_pre_hook(self._not_final) for m in unfinished]
        modules = list(modules)
        chosen = set(modules)
        self._inside = {m: [d for d in m.modules() if d is not m and d in chosen] for m in modules}
        patched = []
        try:
            for module in modules:
                if self._recorded.get(module):   # recorded on an earlier pass (not merely entered, never reached)
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = self._replayer(module, module.forward)
                else:
                    self._recorded[module] = {}
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

    def _next_sample(self, layer, args) -> None:
        self._sample += 1
        self._calls.clear()
        self._unmatched.clear()
        self._final = True

    def _not_final(self, module, args) -> None:
        self._final = False

    def _call_index(self, module: nn.Module) -> int:
        index = self._calls.get(module, 0)
        self._calls[module] = index + 1
        return index

    def _recorder(self, module, args, kwargs, output) -> None:
        self.computed += 1
        tensors = _tensors(output) if self._final and module not in self._unmatched else None
        # Every call gets an entry, so that later calls stay aligned; one that may not be replayed holds None.
        record = _Record(None, None, None) if tensors is None else _Record(
            output, [t._version for t in tensors], _first_input_shape(args, kwargs))
        self._recorded[module].setdefault(self._sample, []).append(record)

    def _replayer(self, module: nn.Module, compute):
        samples = self._recorded[module]

        def forward(*args, **kwargs):
            index = self._call_index(module)
            records = samples.get(self._sample, ())
            if index < len(records) and module not in self._unmatched:
                record = records[index]
                if (record.versions is not None and [t._version for t in _tensors(record.output)] == record.versions
                        and _first_input_shape(args, kwargs) == record.shape):
                    self.replayed += 1
                    self._unmatched.update(self._inside[module])
                    return record.output
            self.computed += 1
            return compute(*args, **kwargs)

        return forward
