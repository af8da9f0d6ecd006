"""The configuration to ship under a weight-memory budget, and the command that reproduces it.

Among finished configurations whose packed weights (`memory.packed_weights_mb`, the report's
weight_mb) fit the budget, the best is the one with the lowest WikiText-2 word perplexity (the
mean over its seeds). The recommendation is the *smallest* configuration that is not
significantly worse than that best one (sweep/analysis/significance.py: paired over the same
evaluation items, seed spread included): a difference inside the noise is no reason to ship
more bytes. Perplexities are only compared between runs with the same model and evaluation
settings (BASELINE_MATCH): by default those of the newest finished run that has a perplexity.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import yaml

from sweep.analysis.allocate import hydra_dict
from sweep.analysis.export import report_tables
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
BOOKKEEPING = ("tracking", "resume", "force", "baseline", "cache_dir")
GROUPS = ("model", "calibration", "eval", "bench")


def comparable_key(run) -> Tuple:
    return tuple(run.data.params.get(k) for k in BASELINE_MATCH if k != "device") + (run.data.tags.get("device"),)


def comparable_runs(runs: Sequence) -> List[Any]:
    """The finished, scored runs with the model and evaluation settings of the newest one."""
    scored = [r for r in runs if r.info.status == "FINISHED" and QUALITY in r.data.metrics and SIZE in r.data.metrics
              and math.isfinite(r.data.metrics[QUALITY])]
    if not scored:
        return []
    newest = max(scored, key=lambda r: r.info.start_time)
    return [r for r in scored if comparable_key(r) == comparable_key(newest)]


@dataclass
class Recommendation:
    chosen: pd.Series             # the configuration's row (sweep.analysis.configs)
    best: pd.Series               # the best configuration under the budget
    configs: pd.DataFrame         # every configuration under the budget, with vs_best against `best`
    runs: List[Any]               # the chosen configuration's runs


def recommend(runs: Sequence, budget_mb: float, client) -> Optional[Recommendation]:
    """The smallest configuration under the budget that is not significantly worse than the best one."""
    fitting = [r for r in comparable_runs(runs) if r.data.metrics[SIZE] <= budget_mb]
    if not fitting:
        return None
    _, table = report_tables(fitting, client)
    table = table[(table["runs"] > 0) & table["wikitext_word_ppl"].notna()]
    if table.empty:
        return None
    best = table.loc[table["wikitext_word_ppl"].idxmin()]
    # vs_best is "best", "same (...)" within the noise, "worse (...)", or "untested (...)": only the
    # first two are candidates (an untested one cannot be said to be as good).
    candidates = table[table["vs_best"].astype(str).str.match(r"^(best|same)")]
    chosen = candidates.sort_values(["weight_mb", "wikitext_word_ppl"]).iloc[0]
    chosen_ids = set(str(chosen["run_ids"]).split(","))
    return Recommendation(chosen, best, table, [r for r in fitting if r.info.run_id in chosen_ids])


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
        # calibration.seed follows the top-level seed by default (${seed}): resolve the defaults at the
        # run's seed, so that only a calibration.seed set apart from it shows up below.
        seed = saved.get("seed", 0)
        defaults = resolved(choices + [f"seed={seed}"])
    args = list(choices) + ([f"seed={seed}"] if seed != 0 else [])
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
    rec = recommend(runs, budget_mb, tracker.client)
    if rec is None:
        smallest = min((r.data.metrics[SIZE] for r in comparable_runs(runs)), default=None)
        hint = f"; the smallest comparable run has {smallest:.2f} MB" if smallest is not None else ""
        print(f"no finished run with a WikiText perplexity fits {budget_mb:g} MB in experiment "
              f"{tracker.experiment_name!r}{hint}")
        return 1
    chosen, best = rec.chosen, rec.best
    run = rec.runs[0]
    print(f"recommended under {budget_mb:g} MB of packed weights ({len(rec.configs)} comparable configurations in "
          f"{tracker.experiment_name!r}, eval limits wikitext={run.data.params.get('eval.limit.wikitext')} "
          f"lambada={run.data.params.get('eval.limit.lambada')}):")
    print(f"  {chosen['config']} ({chosen['weights']}, layer_bits={chosen['layer_bits']}), "
          f"{chosen['runs']} run(s), seeds {chosen['seeds'] or '-'}: runs {chosen['run_ids']}")
    if chosen["config_group"] == best["config_group"]:
        print("  it is the best configuration under the budget")
    else:
        print(f"  the smallest configuration not significantly worse than the best one ({best['config']}, "
              f"{best['weight_mb']:.2f} MB, WikiText-2 {best['wikitext_word_ppl']:.2f}): {chosen['vs_best']}")
    for label, col in (("wikitext.word_perplexity", "wikitext_word_ppl"), ("lambada.acc", "lambada_acc"),
                       ("lambada.perplexity", "lambada_ppl")):
        if pd.notna(chosen[col]):
            spread = f" ± {chosen[col + '_std']:.4f}" if pd.notna(chosen[col + "_std"]) else ""
            interval = (f", 95% CI [{chosen[col + '_ci_low']:.4f}, {chosen[col + '_ci_high']:.4f}]"
                        if pd.notna(chosen[col + "_ci_low"]) else "")
            print(f"  {label} = {chosen[col]:.4f}{spread}{interval}")
    for key in SHOWN:
        if key not in (QUALITY, "lambada.perplexity", "lambada.acc") and key in run.data.metrics:
            print(f"  {key} = {run.data.metrics[key]:.4f}")
    command = reproduce_command(tracker, run)
    seeds = str(chosen["seeds"]).split(",") if chosen["seeds"] else []
    if len(seeds) > 1:  # one command for every seed of the configuration
        command = re.sub(r" seed=\S+", "", command) + f" seed={','.join(seeds)} -m"
    print("reproduce with:")
    print(f"  {command}")
    return 0
