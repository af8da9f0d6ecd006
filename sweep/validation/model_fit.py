"""Checks of a config against the model's shapes, from its config.json alone (no weights read).

- `group_size_errors`: a group size that does not divide a quantized layer's `in_features` leaves
  a ragged last group. The simulated torch backends handle that; packed kernels generally do not,
  so each method says whether it can (`QuantMethod.handles_ragged_groups`).
- `layer_bits_target_errors`: a `method.layer_bits` pattern must match some module the method
  quantizes; the module names come from the model's config on the meta device.

Both run before any model is loaded when the model's config is on this machine (an embedded or
local model); a Hub model's config is known only once loaded, so the run checks again then.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from sweep.config.schema import ConfigError, ModelConfig, SweepConfig
from sweep.methods import get_method
from sweep.methods.base import MixedPrecisionOptions
from sweep.models.checks import linear_in_features, read_model_config
from sweep.models.loading import model_location, model_skeleton
from sweep.quant.layer_bits import parse_layer_bits, unmatched_message, unmatched_patterns
from sweep.quant.layers import quantizable_linears


def _ragged(sizes: Dict[str, int], size: int, candidates: Tuple[int, ...]) -> Optional[Tuple[str, List[int]]]:
    """Where `size` does not divide a layer's in_features: ("n = layer, ..." listing, the candidate sizes
    that divide them all), or None when it divides every one."""
    ragged = {what: n for what, n in sizes.items() if n % size}
    if not ragged:
        return None
    allowed = [g for g in candidates if all(n % g == 0 for n in sizes.values())]
    return ", ".join(f"{n} = {what}" for what, n in ragged.items()), allowed


def group_size_errors(cfg: SweepConfig, model_config: Dict[str, Any]) -> List[str]:
    method = get_method(cfg.method_name)
    if "group_size" not in method.knobs or cfg.group_size == -1 or method.handles_ragged_groups(cfg):
        return []
    found = _ragged(linear_in_features(model_config), cfg.group_size, (16, 32, 64, 128, 256))
    if found is None:
        return []
    listing, allowed = found
    return [f"group_size={cfg.group_size} does not divide in_features of model {cfg.model.name!r} ({listing}), "
            f"and method {cfg.method_name} cannot quantize a ragged last group: allowed here are -1"
            + "".join(f", {g}" for g in allowed)]


def input_group_errors(cfg: SweepConfig, model_config: Dict[str, Any]) -> List[str]:
    """A method's own input group (AQLM's method.in_group_size) must tile every layer exactly."""
    method = get_method(cfg.method_name)
    try:
        size = method.input_group_size(cfg)
    except ValueError:  # unparseable options: reported by the method's own check
        return []
    if not size or size < 1:
        return []
    found = _ragged(linear_in_features(model_config), size, (1, 2, 4, 8, 16, 32))
    if found is None:
        return []
    listing, allowed = found
    return [f"method.in_group_size={size} does not divide in_features of model {cfg.model.name!r} ({listing}): "
            f"method {cfg.method_name} needs whole groups; allowed here are {', '.join(map(str, allowed))}"]


def check_against_model(cfg: SweepConfig, model_config: Optional[Dict[str, Any]] = None) -> None:
    """Raise ConfigError for settings this model's shapes rule out.

    Before loading, from the config.json of a local or embedded model (no weights are read); the
    run passes a loaded Hub model's config, which is only known then, before quantizing.
    """
    if model_config is None and cfg.model.init == "random":
        model_config = dict(cfg.model.architecture or {})  # the path supplies only the tokenizer
    if model_config is None:
        model_config = read_model_config(model_location(cfg.model, cfg.cache_dir))
    errors = group_size_errors(cfg, model_config) + input_group_errors(cfg, model_config)
    if not errors:  # a ragged group already says what to change; the kernel's own limits come next
        errors = get_method(cfg.method_name).kernel_shape_errors(cfg, linear_in_features(model_config))
    if errors:
        raise ConfigError("invalid config for this model:\n  - " + "\n  - ".join(errors))


def layer_bits_target_errors(cfg: SweepConfig) -> List[str]:
    """`method.layer_bits` patterns that match no module this run would quantize. Silent when the
    model's config is not on this machine yet (the plan is checked again on the loaded model)."""
    method = get_method(cfg.method_name)
    if method.Options is None or not issubclass(method.Options, MixedPrecisionOptions):
        return []
    parsed, errors = parse_layer_bits(cfg.method.get("layer_bits"))
    if errors or not parsed or cfg.model.init == "random":  # parse errors come from the method's own check
        return []
    names = _target_names(cfg.model.path, cfg.model.num_layers, cfg.model.trust_remote_code, cfg.cache_dir,
                          cfg.quantize_lm_head)
    if names is None:
        return []
    unmatched = unmatched_patterns(parsed, names)
    return [unmatched_message(unmatched, names, cfg.quantize_lm_head)] if unmatched else []


class _NoSkeleton(Exception):
    pass


def _target_names(path: str, num_layers: Optional[int], trust_remote_code: bool, cache_dir: str,
                  quantize_lm_head: bool) -> Optional[Tuple[str, ...]]:
    """The module names the method would quantize, or None while the model's config is not on this
    machine. Only found names are cached: an embedded model converted later in the same process
    (a test session's first validation can come before its conversion) is then looked up again."""
    try:
        return _cached_target_names(path, num_layers, trust_remote_code, cache_dir, quantize_lm_head)
    except _NoSkeleton:
        return None


@lru_cache(maxsize=8)  # a grid validates every point; the skeleton is the same for all of them
def _cached_target_names(path: str, num_layers: Optional[int], trust_remote_code: bool, cache_dir: str,
                         quantize_lm_head: bool) -> Tuple[str, ...]:
    try:
        skeleton = model_skeleton(ModelConfig(path=path, num_layers=num_layers, trust_remote_code=trust_remote_code),
                                  cache_dir)
    except Exception as exc:  # noqa: BLE001 - an unreadable model config is reported by the model load itself
        raise _NoSkeleton from exc
    if skeleton is None:
        raise _NoSkeleton
    return tuple(quantizable_linears(skeleton, include_lm_head=quantize_lm_head))
