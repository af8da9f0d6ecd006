"""Quality through lm-eval: WikiText-2 perplexities and LAMBADA perplexity/accuracy of the in-memory model.

The model object itself goes to lm-eval (`HFLM(pretrained=<model>)`), so what is scored is
exactly what was quantized, with no save/reload in between. Tasks come from sweep/data/tasks
(the vendored data), so nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Tuple

from sweep.config.schema import EvalConfig
from sweep.data.tasks import LM_EVAL_TASKS, write_task_dir

log = logging.getLogger(__name__)

# lm-eval result keys → our metric names (the part after "<task>.")
METRICS = {
    "wikitext": {"word_perplexity,none": "word_perplexity", "byte_perplexity,none": "byte_perplexity",
                 "bits_per_byte,none": "bits_per_byte"},
    "lambada": {"perplexity,none": "perplexity", "acc,none": "acc", "acc_stderr,none": "acc_stderr"},
}


def make_lm(model, tokenizer, cfg: EvalConfig):
    from lm_eval.models.huggingface import HFLM

    kwargs: Dict[str, Any] = dict(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    if cfg.max_length is not None:
        kwargs["max_length"] = cfg.max_length
    return HFLM(**kwargs)


def task_manager(cache_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_task_dir(cache_dir / "lm_eval_tasks")), include_defaults=False)


def evaluate(model, tokenizer, cfg: EvalConfig, cache_dir: Path, seed: int = 0) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Run each configured task (each with its own limit); return (metrics, lm-eval's raw results per task)."""
    import datasets
    import lm_eval

    if not cfg.tasks:
        return {}, {}
    datasets.disable_progress_bars()  # "Generating test split" bars; lm-eval's own request bars stay
    lm = make_lm(model, tokenizer, cfg)
    manager = task_manager(cache_dir)
    metrics: Dict[str, float] = {}
    raw: Dict[str, Any] = {}
    for task in cfg.tasks:
        name = LM_EVAL_TASKS[task]
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=manager, limit=cfg.limit.get(task),
            bootstrap_iters=cfg.bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
        )
        results = out["results"][name]
        raw[task] = {"results": results, "n-samples": out.get("n-samples", {}).get(name),
                     "config": out.get("configs", {}).get(name), "versions": out.get("versions", {}).get(name)}
        for key, metric in METRICS[task].items():
            value = results.get(key)
            if isinstance(value, (int, float)):
                metrics[f"{task}.{metric}"] = float(value)
        n = (out.get("n-samples", {}).get(name) or {}).get("effective")
        if n is not None:
            metrics[f"{task}.samples"] = float(n)
    return metrics, raw
