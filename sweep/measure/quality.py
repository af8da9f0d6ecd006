"""Quality through lm-eval: WikiText-2 perplexities and LAMBADA perplexity/accuracy of the in-memory model.

The model object itself goes to lm-eval (`HFLM(pretrained=<model>)`, as sweep/measure/scored_lm.py's
subclass), so what is scored is exactly what was quantized, with no save/reload in between. Tasks come
from sweep/data/tasks (the vendored data), so nothing is downloaded.

Each task also returns its per-item results (lm-eval's logged samples: one entry per WikiText
document, one per LAMBADA passage), from which every metric gets a 95% bootstrap interval
(sweep/measure/uncertainty.py) and which the report uses for paired comparisons. lm-eval's own
standard errors are kept too (`lambada.acc_stderr` in closed form, `lambada.perplexity_stderr` by
its bootstrap, which costs little on one process).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Dict, Tuple

from sweep.config.schema import EvalConfig
from sweep.data.tasks import LM_EVAL_TASKS, write_task_dir
from sweep.measure.uncertainty import items_from_samples, metric_intervals

log = logging.getLogger(__name__)

# lm-eval result keys → our metric names (the part after "<task>.")
METRICS = {
    "wikitext": {"word_perplexity,none": "word_perplexity", "byte_perplexity,none": "byte_perplexity",
                 "bits_per_byte,none": "bits_per_byte"},
    "lambada": {"perplexity,none": "perplexity", "acc,none": "acc", "acc_stderr,none": "acc_stderr",
                "perplexity_stderr,none": "perplexity_stderr"},
}


def make_lm(model, tokenizer, cfg: EvalConfig):
    # lm-eval's HFLM, normalising only the positions a batch scores (the same numbers, less work).
    from sweep.measure.scored_lm import ScoredPositionsLM

    kwargs: Dict[str, Any] = dict(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    if cfg.max_length is not None:
        kwargs["max_length"] = cfg.max_length
    # lm-eval's log-softmax keeps the logits' dtype unless told otherwise, and a request's log-likelihood
    # is the sum of those values: in bfloat16 a 2,048-token WikiText window's sum (~7,000 nats) comes back
    # rounded to a multiple of 32, which moved word perplexity in steps of 0.3-0.6%. Scores in float32
    # whatever the model runs in (a float32 model: the same arithmetic as before).
    kwargs["softmax_dtype"] = "float32"
    return ScoredPositionsLM(**kwargs)


def task_manager(cache_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_task_dir(cache_dir / "lm_eval_tasks")), include_defaults=False)


@contextlib.contextmanager
def _without_env_info():
    """lm-eval adds the machine's environment to its results (torch's collect_env, which runs `pip list`
    in a subprocess: about 1 s per call). sweep keeps only results, sample counts, configs and versions
    from them (its own environment tags are on every run), so that entry is not collected."""
    import lm_eval.evaluator as evaluator

    real = evaluator.add_env_info
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.add_env_info = real


def evaluate(model, tokenizer, cfg: EvalConfig, cache_dir: Path,
             seed: int = 0) -> Tuple[Dict[str, float], Dict[str, Any], Dict[str, Dict[str, list]]]:
    """Run each configured task (each with its own limit).

    Returns (metrics with their intervals, lm-eval's raw results per task, per-item results per task).
    """
    import datasets
    import lm_eval

    if not cfg.tasks:
        return {}, {}, {}
    datasets.disable_progress_bars()  # "Generating test split" bars; lm-eval's own request bars stay
    # lm-eval's bootstrap otherwise forks a process pool per metric: slower than the work for our sizes.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    lm = make_lm(model, tokenizer, cfg)
    names = {task: LM_EVAL_TASKS[task] for task in cfg.tasks}
    # One lm-eval call for every task (its set-up, e.g. collecting environment info, costs ~1 s a call);
    # each task's limit becomes its first `limit` documents, as lm-eval's `limit` would take them.
    samples = {names[task]: list(range(limit)) for task, limit in cfg.limit.items()
               if task in names and limit is not None}
    printed = io.StringIO()  # lm-eval prints ("bootstrapping for stddev: ...") besides logging: to the log
    with contextlib.redirect_stdout(printed), _without_env_info():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(names.values()), task_manager=task_manager(cache_dir), samples=samples or None,
            bootstrap_iters=cfg.bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=True,
        )
    if printed.getvalue().strip():
        log.info("lm-eval printed: %s", printed.getvalue().strip())
    metrics: Dict[str, float] = {}
    raw: Dict[str, Any] = {}
    items: Dict[str, Dict[str, list]] = {}
    for task, name in names.items():
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
        items[task] = items_from_samples(task, out["samples"][name])
    metrics.update(metric_intervals(items))
    return metrics, raw, items
