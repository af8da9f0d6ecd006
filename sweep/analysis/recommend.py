"""The best configuration in the store under a weight-memory budget, and the command that reproduces it.

"Best" is the lowest WikiText-2 word perplexity among finished runs whose packed weights
(`memory.packed_weights_mb`, the report's weight_mb) fit the budget. Perplexities are only
compared between runs with the same model and evaluation settings (BASELINE_MATCH): by default
those of the newest finished run that has a perplexity.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from sweep.analysis.allocate import hydra_dict
from sweep.analysis.table import BASELINE_MATCH
from sweep.config.schema import CONF_DIR, register_configs
from sweep.methods import get_method
from sweep.tracking.tracker import Tracker, point_runs, read_artifact
from sweep.validation.fields import to_sweep_config

QUALITY = "wikitext.word_perplexity"
SIZE = "memory.packed_weights_mb"
SHOWN = [QUALITY, "wikitext.bits_per_byte", "lambada.perplexity", "lambada.acc", SIZE, "quant.bits_per_weight",
         "memory.peak_mb", "time.quantize_s", "latency.tokens_per_s"]
# Config fields that never change a result, left out of the reproducing command.
BOOKKEEPING = ("tracking", "resume", "force", "cache_dir")
GROUPS = ("model", "calibration", "eval", "bench")


def comparable_key(run) -> Tuple:
    return tuple(run.data.params.get(k) for k in BASELINE_MATCH if k != "device") + (run.data.tags.get("device"),)


def recommend(runs: Sequence, budget_mb: float) -> Tuple[Optional[Any], List[Any]]:
    """(best run under the budget or None, the comparable runs considered)."""
    scored = [r for r in runs if r.info.status == "FINISHED" and QUALITY in r.data.metrics and SIZE in r.data.metrics
              and math.isfinite(r.data.metrics[QUALITY])]
    if not scored:
        return None, []
    newest = max(scored, key=lambda r: r.info.start_time)
    comparable = [r for r in scored if comparable_key(r) == comparable_key(newest)]
    fitting = [r for r in comparable if r.data.metrics[SIZE] <= budget_mb]
    best = min(fitting, key=lambda r: (r.data.metrics[QUALITY], r.data.metrics[SIZE]), default=None)
    return best, comparable


def reproduce_command(tracker: Tracker, run) -> str:
    """`python -m sweep ...` with every setting of the run that differs from the defaults of its method."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    saved = yaml.safe_load(read_artifact(tracker.client, run.info.run_id, "config.yaml"))
    method = saved["method"]["name"]
    # Calibration settings do not change a method that takes no calibration data: left out.
    ignored = () if get_method(method).needs_calibration else ("calibration",)
    register_configs()
    GlobalHydra.instance().clear()
    choices = [f"method={method}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def resolved(overrides):
            return asdict(to_sweep_config(compose(config_name="config", overrides=overrides)))

        # Name config options where the run used one unchanged (model=smollm2-135m, bench=none, ...).
        for group in (g for g in GROUPS if g not in ignored):
            for option in sorted((CONF_DIR / group).glob("*.yaml")):
                try:
                    same = resolved(choices + [f"{group}={option.stem}"])[group] == saved.get(group)
                except Exception:  # noqa: BLE001 - an option that does not validate here is simply not it
                    same = False
                if same:
                    choices.append(f"{group}={option.stem}")
                    break
        defaults = resolved(choices)
    args = list(choices)
    for key, value in _flat(saved).items():
        if key.split(".")[0] in BOOKKEEPING + ignored or key == "method.name":
            continue
        default = _flat(defaults).get(key, _MISSING)
        if key == "method.layer_bits":
            if value:
                args.append(f"'+method.layer_bits={hydra_dict(value)}'")
            continue
        if value != default:
            args.append(f"{'+' if default is _MISSING else ''}{key}={_hydra_value(value)}")
    return "python -m sweep " + " ".join(args)


_MISSING = object()


def _flat(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "method.layer_bits":
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "'[" + ",".join(_hydra_value(v) for v in value) + "]'"
    if isinstance(value, dict):
        return "'{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}'"
    text = str(value)
    return f"'{text}'" if any(c in text for c in " :,[]{}'\"*") else text


def print_recommendation(tracker: Tracker, budget_mb: float) -> int:
    runs = point_runs(tracker)
    best, comparable = recommend(runs, budget_mb)
    if best is None:
        smallest = min((r.data.metrics[SIZE] for r in comparable), default=None)
        hint = f"; the smallest comparable run has {smallest:.2f} MB" if smallest is not None else ""
        print(f"no finished run with a WikiText perplexity fits {budget_mb:g} MB in experiment "
              f"{tracker.experiment_name!r}{hint}")
        return 1
    m, tags = best.data.metrics, best.data.tags
    print(f"best under {budget_mb:g} MB of packed weights ({len(comparable)} comparable runs in "
          f"{tracker.experiment_name!r}, eval limits wikitext={best.data.params.get('eval.limit.wikitext')} "
          f"lambada={best.data.params.get('eval.limit.lambada')}):")
    print(f"  run {best.info.run_name!r} ({best.info.run_id}); method={tags.get('method')} weights={tags.get('weights')} "
          f"bits={tags.get('bits')} group_size={tags.get('group_size')} layer_bits={tags.get('layer_bits', 'uniform')}")
    for key in SHOWN:
        if key in m:
            print(f"  {key} = {m[key]:.4f}")
    print("reproduce with:")
    print(f"  {reproduce_command(tracker, best)}")
    return 0
