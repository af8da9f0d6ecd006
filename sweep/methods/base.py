"""The interface every quantization method implements.

A method is one module in this package defining one subclass of `QuantMethod`, plus one
`conf/method/<name>.yaml`; the registry (`sweep.methods`) finds it by its `name`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
import torch
from torch import nn

from sweep.infra.progress import Progress
from sweep.quant.layer_bits import ALLOWED_BITS, KEEP_BITS, LayerSetting, parse_layer_bits, plan_layers

# Values of the `weights` tag: whether a low-bit kernel runs the weights, or they are
# quantize-dequantized values stored in the original dtype.
PACKED = "packed"
SIMULATED = "simulated"
UNQUANTIZED = "unquantized"


def runs_on_cuda(device: str) -> bool:
    """Whether a run with this `device` setting will run on CUDA (device=auto picks it where torch
    sees one), for a method's checks before any model loads. `models.loading.resolve_device` cannot
    serve them: it raises for device=cuda without CUDA, and a check must report, not raise."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@dataclass
class QuantReport:
    """What a method did to the model, for tags, metrics and the report."""

    backend: str                  # library or implementation that quantized ("sweep-torch", "gptqmodel", ...)
    weights: str                  # PACKED, SIMULATED or UNQUANTIZED
    kernel: str = "none"          # kernel that runs the weights at inference
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per quantized module: bits, group_size, in/out features, error
    notes: List[str] = field(default_factory=list)
    # Set by backends that reload the packed checkpoint: the model to measure from now on
    # (it replaces the one given to quantize()), and the directory holding that checkpoint.
    model: Optional[nn.Module] = None
    saved_dir: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)   # method-specific metrics, logged as they are
    # Why this backend's result can differ between runs of the same config and seed (tag
    # deterministic=false); None when it cannot, as far as the run can tell.
    nondeterministic: Optional[str] = None
    artifacts: Dict[str, Any] = field(default_factory=dict)   # artifact file name → JSON-able content
    # Tags that say more precisely what this method did than the top-level knobs (AQLM's group_size
    # is its own input group, not the top-level group_size); they replace the run's tags of that name.
    tags: Dict[str, str] = field(default_factory=dict)
    # Bytes of quantized-weight tensors the backend's modules hold outside their parameters and
    # buffers (HQQLinear keeps its scales and zeros in a plain dict), so that the measured footprint
    # (`memory.weights_mb`) counts them.
    unregistered_weight_bytes: int = 0

    @property
    def num_layers(self) -> int:
        """Modules actually quantized (a mixed-precision plan may keep some at KEEP_BITS)."""
        return sum(1 for rec in self.layers.values() if rec["bits"] != KEEP_BITS)


@dataclass
class MixedPrecisionOptions:
    """Options of methods that take per-module bits (sweep/quant/layer_bits.py)."""

    # {module-name glob: bits, or {bits, group_size}}; unmatched modules use the top-level bits/group_size.
    layer_bits: Dict[str, Any] = field(default_factory=dict)


class QuantMethod:
    name: ClassVar[str]
    # Which top-level knobs change this method's result; the others are left out of the run's identity.
    knobs: ClassVar[FrozenSet[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False
    # Whether a sweep over this method adds its fp16 baseline (a measurement such as sensitivity needs none).
    compared_with_baseline: ClassVar[bool] = True
    # Method-specific options (the rest of conf/method/<name>.yaml), as a dataclass.
    Options: ClassVar[Optional[type]] = None
    # Capabilities, checked before anything runs: the bit widths it can produce, and whether a
    # group_size that does not divide a layer's in_features (a smaller last group) is allowed.
    supported_bits: ClassVar[FrozenSet[int]] = frozenset(range(1, 9))
    ragged_groups: ClassVar[bool] = False

    @classmethod
    def input_group_size(cls, cfg) -> Optional[int]:
        """A group size of the method's own (not the `group_size` knob) that must divide every quantized
        layer's in_features, or None; checked against the model's shapes before it loads."""
        return None

    @classmethod
    def kernel_shape_errors(cls, cfg, in_features: Dict[str, int]) -> List[str]:
        """Errors for a kernel option that cannot run linears of these in_features (from the model's
        config: what sets each, e.g. hidden_size, and its value); checked before the model loads."""
        return []

    @classmethod
    def handles_ragged_groups(cls, cfg) -> bool:
        """Whether this run can quantize a ragged last group (options may narrow `ragged_groups`)."""
        return cls.ragged_groups

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.options = self.parse_options(cfg.method)
        # Set by the run (attach) for backends that work from a checkpoint directory.
        self.tokenizer = None
        self.workdir: Optional[str] = None

    def attach(self, tokenizer, workdir: str) -> None:
        """Give the method what path-based backends need: the tokenizer and a scratch directory."""
        self.tokenizer = tokenizer
        self.workdir = workdir

    @classmethod
    def parse_options(cls, method_cfg: Dict[str, Any]) -> Any:
        extra = {k: v for k, v in dict(method_cfg).items() if k != "name"}
        if cls.Options is None:
            if extra:
                raise ValueError(f"method {cls.name} takes no options, got {sorted(extra)}")
            return None
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), extra))
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", "")
            raise ValueError(f"method.{key}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def config_errors(cls, cfg) -> List[str]:
        """Problems with this config for this method, found without loading a model."""
        try:
            options = cls.parse_options(cfg.method)
        except ValueError as exc:
            return [str(exc)]
        errors = cls.check_options(cfg, options)
        if "bits" in cls.knobs and 1 <= cfg.bits <= 8 and cfg.bits not in cls.supported_bits:
            errors.append(f"bits={cfg.bits!r} is not allowed for method {cls.name}: it supports "
                          f"{', '.join(map(str, sorted(cls.supported_bits)))}")
        return errors

    @classmethod
    def check_options(cls, cfg, options) -> List[str]:
        if isinstance(options, MixedPrecisionOptions):
            # Values only; which modules the patterns match is checked against the model by
            # sweep.validation.model_fit (and again on the loaded model, by plan_layers).
            parsed, errors = parse_layer_bits(options.layer_bits)
            for pattern, entry in parsed.items():
                bits = entry.get("bits")
                if bits in ALLOWED_BITS and bits != KEEP_BITS and bits not in cls.supported_bits:
                    errors.append(f"method.layer_bits[{pattern!r}]: bits={bits!r} is not allowed for method {cls.name}: "
                                  f"{', '.join(map(str, sorted(cls.supported_bits)))}, or {KEEP_BITS} (leave the "
                                  "module unquantized)")
            return errors
        return []

    def layer_plan(self, target_names) -> Dict[str, LayerSetting]:
        """Bits and group size per target module: the top-level knobs, overridden by method.layer_bits."""
        layer_bits = self.options.layer_bits if isinstance(self.options, MixedPrecisionOptions) else None
        return plan_layers(target_names, layer_bits, self.cfg.bits, self.cfg.group_size, self.cfg.quantize_lm_head)

    def quantize(self, model: nn.Module, calibration: Optional[list], progress: Progress) -> QuantReport:
        raise NotImplementedError
