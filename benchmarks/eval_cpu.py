"""Time the evaluation (lm-eval through sweep's scored-positions model) of the unquantized embedded model.

    python benchmarks/eval_cpu.py                                   # eval=quick, bf16 where the CPU has it, 3 runs
    python benchmarks/eval_cpu.py --tasks lambada --compare-head    # LAMBADA, head over scored positions vs every one
    python benchmarks/eval_cpu.py --dtype float32 --repeats 1

Everything runs in one process on one loaded model, so repeats and the compared variants meet the same host
minute; with --compare-head the two alternate (head over every position first), and each line prints the
time and the metrics, which must be equal between the variants (sweep/measure/scored_lm.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep.config.schema import SweepConfig  # noqa: E402
from sweep.infra.hardware import cpu_has_bf16  # noqa: E402
from sweep.measure import scored_lm  # noqa: E402
from sweep.measure.quality import evaluate  # noqa: E402
from sweep.models.loading import load_model  # noqa: E402

SHOWN = ("wikitext.word_perplexity", "lambada.perplexity", "lambada.acc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16" if cpu_has_bf16() else "float32")
    ap.add_argument("--tasks", default="wikitext,lambada")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-head", action="store_true",
                    help="alternate the head over every position (lm-eval's shape) with the head over scored ones")
    args = ap.parse_args()
    cfg = SweepConfig()
    cfg.model.dtype = args.dtype
    cfg.eval.tasks = args.tasks.split(",")
    cache = Path(cfg.cache_dir).expanduser()
    model, tokenizer = load_model(cfg.model, "cpu", str(cache))
    trimmed = scored_lm._takes_logits_to_keep
    variants = {"head everywhere": lambda model: False, "head scored": trimmed} if args.compare_head else {
        "as configured": trimmed}
    for repeat in range(args.repeats):
        for name, takes in variants.items():
            scored_lm._takes_logits_to_keep = takes
            start = time.perf_counter()
            metrics, _, _ = evaluate(model, tokenizer, cfg.eval, cache)
            seconds = time.perf_counter() - start
            shown = {k: metrics[k] for k in SHOWN if k in metrics}   # unrounded: the variants' bits compare
            print(f"{args.dtype} {name} run {repeat + 1}: {seconds:.2f} s {shown}", flush=True)
    scored_lm._takes_logits_to_keep = trimmed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
