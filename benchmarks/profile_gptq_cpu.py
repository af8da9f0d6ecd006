"""Where one torch-backend GPTQ quantize of the embedded model spends its time (CPU, default calibration).

    python benchmarks/profile_gptq_cpu.py [DTYPE] [BATCH_TOKENS] [REPLAY]   # e.g. bfloat16 0, float32 8192 0

Loads the default model in DTYPE, builds the default calibration (32 × 256 LAMBADA-dev windows), runs
`method=gptq` (4 bits, group 128) with `method.batch_tokens=BATCH_TOKENS` under cProfile, and prints the
wall time, the time in each stage (first-layer capture, grouping pass, calibration passes incl. the
Hessian hooks, solver, full passes) and the top functions by own time. REPLAY=0 turns off the replay of
finished linears' outputs (sweep/quant/replay.py), to time the calibration passes without it.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sweep.methods.gptq as gptq_module  # noqa: E402
import sweep.quant.sequential as sequential_module  # noqa: E402
from sweep.config.schema import SweepConfig  # noqa: E402
from sweep.data.calibration import build_samples  # noqa: E402
from sweep.infra.progress import Progress  # noqa: E402
from sweep.methods import get_method  # noqa: E402
from sweep.models.loading import load_model  # noqa: E402

STAGES = ["capture_first_layer_inputs", "sequential_groups", "run_layer_until", "gptq_quantize", "run_layer"]


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    batch_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    replay = sys.argv[3] != "0" if len(sys.argv) > 3 else True
    if not replay:
        sequential_module.MAX_REPLAY_BYTES = -1
    cfg = SweepConfig()
    cfg.model.dtype = dtype
    cfg.calibration.nsamples, cfg.calibration.seqlen = 32, 256
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    samples = build_samples(tokenizer, cfg.calibration)
    seconds = {}
    for name in STAGES:  # time each stage where the method calls it (the calibration passes live in sequential.py)
        module = gptq_module if hasattr(gptq_module, name) else sequential_module
        original = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - t0
        setattr(module, name, timed)
    run_cfg = OmegaConf.structured(cfg)
    run_cfg.method = {"name": "gptq", "batch_tokens": batch_tokens}
    method = get_method("gptq")(run_cfg)
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    method.quantize(model, samples, Progress(enabled=False))
    profile.disable()
    print(f"{dtype}, batch_tokens={batch_tokens}, replay={replay}, {torch.get_num_threads()} threads: {time.perf_counter() - t0:.1f} s")
    print({name: round(value, 2) for name, value in seconds.items()})
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
