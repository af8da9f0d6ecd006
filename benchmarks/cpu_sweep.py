"""CPU benchmark: one default point and the README's 6-point GPTQ grid, phase by phase, float32 vs bfloat16.

    python benchmarks/cpu_sweep.py                       # both dtypes where the CPU has bf16 (~25 min on 2 cores)
    python benchmarks/cpu_sweep.py --dtypes bfloat16     # one dtype
    python benchmarks/cpu_sweep.py --dry-run             # print the commands only
    python benchmarks/cpu_sweep.py --out benchmarks/results/cpu-DATE-NAME.csv   # another result file

For each dtype it measures, in the same process and minutes as the sweeps, the matmul peak of the
model's largest calibration shape (8192×576 @ 576×1536, median of 10), then runs
`python -m sweep model.dtype=D` (one point) and `python -m sweep method=gptq bits=2,3,4
group_size=16,128 model.dtype=D -m` (the grid, with the fp16 baseline every sweep includes) into
their own MLflow store under outputs/bench-cpu/, timing each command as a whole. Per run it reads
back the phase times (load, calibrate, quantize, generate, eval) and turns the two compute-bound
phases into achieved FLOP/s from the model's shapes:

- quantize: the calibration forward passes (GPTQ's true-sequential passes, each stopped once its
  group has its inputs, each linear's product computed once) plus the Hessian products, per
  calibration token; the solver's column loop
  is not counted (its arithmetic is small; its time is per-column overhead);
- eval: every evaluated token through every decoder linear, and the LM head over the positions that are
  scored (every WikiText token, each LAMBADA passage's last word: on a CPU the head runs from a batch's
  first scored position, sweep/measure/scored_lm.py, so this slightly undercounts); attention scores are
  not counted (under 20% of the work at these lengths).

Writes benchmarks/results/cpu-<date>.csv (or --out), the commands' wall times, the CPU's model and its bfloat16
instructions on every row, and prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sweep.config.schema import SweepConfig, TrackingConfig  # noqa: E402
from sweep.infra.hardware import bf16_instructions, cpu_has_bf16, cpu_model  # noqa: E402
from sweep.models.embedded import embedded_model_dir  # noqa: E402
from sweep.tracking.tracker import Tracker, point_runs  # noqa: E402

GRID = ["method=gptq", "bits=2,3,4", "group_size=16,128"]
PHASES = ["load", "calibrate", "quantize", "generate", "eval"]


def matmul_gflops(dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(8192, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 8192 * 576 * 1536 / statistics.median(times) / 1e9


def default_model_dir() -> Path:
    """The default config's embedded model, where `python -m sweep` keeps it ($SWEEP_CACHE included)."""
    cfg = SweepConfig()
    return embedded_model_dir(cfg.model.path.split(":", 1)[1], cfg.cache_dir)


def model_shapes(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (config.get("head_dim") or h // config["num_attention_heads"])
    return {"h": h, "i": i, "kv": kv, "layers": config["num_hidden_layers"], "vocab": config["vocab_size"]}


def quantize_flops_per_token(s: dict) -> float:
    """Calibration forward passes of true-sequential GPTQ, plus the Hessian products. Each pass stops
    where its group's input arrives and replays what finished linears computed on an earlier pass
    (sweep/quant/replay.py), so every decoder linear multiplies each calibration token once."""
    h, i, kv = s["h"], s["i"], s["kv"]
    linears = h * (h + 2 * kv) + h * h + 3 * h * i
    hessians = 3 * h * h + i * i              # one per group: q/k/v, o, gate/up (h wide), down (i wide)
    return 2 * s["layers"] * (linears + hessians)


def eval_flops(s: dict, tokens: int, scored: int) -> float:
    """Every evaluated token through the decoder linears; the scored positions through the head too."""
    h, i, kv = s["h"], s["i"], s["kv"]
    return 2 * (tokens * s["layers"] * (h * (h + 2 * kv) + h * h + 3 * h * i) + scored * h * s["vocab"])


def eval_tokens(model_dir: Path, limit_wikitext: int = 2, limit_lambada: int = 200) -> tuple:
    """(evaluated tokens, scored positions) of eval=quick: WikiText scores every token, LAMBADA its last word."""
    from transformers import AutoTokenizer

    from sweep.data.vendored import data_file, wikitext_documents

    tok = AutoTokenizer.from_pretrained(model_dir)
    wikitext = sum(len(tok(d).input_ids) for d in wikitext_documents()[:limit_wikitext])
    lines = data_file("lambada_openai.test.jsonl").read_text().splitlines()[:limit_lambada]
    texts = [json.loads(line)["text"] for line in lines]
    lambada = sum(len(tok(text).input_ids) for text in texts)
    contexts = sum(len(tok(text.rsplit(" ", 1)[0]).input_ids) for text in texts)   # all but the last word
    return wikitext + lambada, wikitext + lambada - contexts


def run(cmd, dry_run: bool) -> float:
    print(" ".join(cmd), flush=True)
    if dry_run:
        return 0.0
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16" if cpu_has_bf16() else "float32")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--store", default=str(REPO / "outputs" / "bench-cpu"))
    ap.add_argument("--out", default=None, help="the CSV to write (default benchmarks/results/cpu-<date>.csv)")
    args = ap.parse_args()
    model_dir = default_model_dir()
    shapes = model_shapes(model_dir)
    tokens, scored = eval_tokens(model_dir)
    rows, walls = [], []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        peak = matmul_gflops(dtype)
        # The single point and the grid get stores of their own: in one store the grid would skip its
        # W4 g128 point as already finished (resume) and its wall time would cover 6 points, not 7.
        uris = {part: f"sqlite:///{Path(args.store) / name / part}/mlflow.db" for part in ("one", "grid")}
        for part in uris:
            (Path(args.store) / name / part).mkdir(parents=True, exist_ok=True)
        common = [f"model.dtype={name}", "tracking.experiment=bench-cpu"]
        one = run([sys.executable, "-m", "sweep", *common, f"tracking.uri={uris['one']}",
                   f"hydra.run.dir={Path(args.store) / name / 'one'}"], args.dry_run)
        grid = run([sys.executable, "-m", "sweep", *GRID, *common, f"tracking.uri={uris['grid']}",
                    f"hydra.sweep.dir={Path(args.store) / name / 'grid'}", "-m"], args.dry_run)
        # Which CPU: the same 2-core machine type has been an Intel Xeon with AMX and an AMD EPYC without it.
        walls.append({"dtype": name, "matmul_gflops": peak, "one_point_wall_s": one, "grid_wall_s": grid,
                      "cpu": cpu_model(), "bf16_instructions": bf16_instructions()})
        if args.dry_run:
            continue
        runs = [(part, r) for part, uri in uris.items()
                for r in point_runs(Tracker(TrackingConfig(uri=uri, experiment="bench-cpu"), "bench-cpu"))]
        for part, r in runs:
            m, tags = r.data.metrics, r.data.tags
            calib_tokens = float(tags.get("calibration.tokens", 0) or 0)
            row = {"dtype": name, "part": part, "run": r.info.run_name, "method": tags.get("method"), "bits": tags.get("bits"),
                   "group_size": tags.get("group_size"), "wikitext_word_ppl": m.get("wikitext.word_perplexity"),
                   "lambada_ppl": m.get("lambada.perplexity"), "lambada_acc": m.get("lambada.acc"),
                   **{f"{p}_s": m.get(f"time.{p}_s") for p in PHASES}}
            if calib_tokens and m.get("time.quantize_s"):
                row["quantize_gflops"] = quantize_flops_per_token(shapes) * calib_tokens / m["time.quantize_s"] / 1e9
            if m.get("time.eval_s"):
                row["eval_gflops"] = eval_flops(shapes, tokens, scored) / m["time.eval_s"] / 1e9
            row["matmul_peak_gflops"] = peak
            rows.append(row)
    if args.dry_run:
        return 0
    table = pd.DataFrame(rows)
    # The commands' wall times, on every row of their dtype (the CSV is then the whole result).
    table = table.merge(pd.DataFrame(walls).drop(columns="matmul_gflops"), on="dtype", how="left")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"cpu-{time.strftime('%Y-%m-%d')}.csv"
    table.to_csv(out, index=False)
    print(pd.DataFrame(walls).round(1).to_markdown(index=False))
    print()
    print(table.round(2).to_markdown(index=False))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
