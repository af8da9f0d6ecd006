"""Time the default GPTQ quantize (torch backend) of the embedded model, repeated in one process.

    python benchmarks/quantize_cpu.py                      # bf16 where the CPU has it, 3 runs
    python benchmarks/quantize_cpu.py --compare --repeats 3
    python benchmarks/quantize_cpu.py --dtype float32 --repeats 1

The model is loaded once and its unquantized weights are put back before every run, so repeats and the
compared variants meet the same host minute. With --compare four variants alternate: the layer's norms
replayed or computed on every calibration pass (sweep/quant/replay.py), and the Hessian's bfloat16 rows
gathered in one buffer reused from group to group or in a fresh one per group (sweep/quant/gptq_solver.py).
Each line prints the wall time, the minor page faults and system CPU time of the run (a fresh block of
memory is faulted in page by page), and the checksum of the quantized decoder, which must be the same for
every variant.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep.config.schema import SweepConfig  # noqa: E402
from sweep.data.calibration import build_samples  # noqa: E402
from sweep.infra.hardware import configure_threads, cpu_has_bf16  # noqa: E402
from sweep.infra.progress import Progress  # noqa: E402
from sweep.methods import get_method  # noqa: E402
from sweep.models.loading import load_model  # noqa: E402
from sweep.quant import gptq_solver, sequential  # noqa: E402
from sweep.quant.layers import decoder_checksum  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16" if cpu_has_bf16() else "float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", action="store_true",
                    help="alternate norms replayed or not × the Hessian's row buffer reused or not")
    args = ap.parse_args()
    configure_threads()
    cfg = SweepConfig()
    cfg.model.dtype = args.dtype
    cfg.calibration.nsamples, cfg.calibration.seqlen = 32, 256   # the CPU default (docs/calibration.md)
    model, tokenizer = load_model(cfg.model, "cpu", str(Path(cfg.cache_dir).expanduser()))
    unquantized = copy.deepcopy(model.state_dict())
    samples = build_samples(tokenizer, cfg.calibration)
    run_cfg = OmegaConf.structured(cfg)
    run_cfg.method = {"name": "gptq"}
    norms, row_buffer = sequential.untargeted_children, sequential.SequentialCalibration._row_buffer
    variants = [(True, True), (False, False), (True, False), (False, True)] if args.compare else [(True, True)]
    for repeat in range(args.repeats):
        for replay_norms, reuse_rows in variants:
            sequential.untargeted_children = norms if replay_norms else (lambda layer, targets: [])
            sequential.SequentialCalibration._row_buffer = row_buffer if reuse_rows else (
                lambda self, index: gptq_solver.RowBuffer())
            model.load_state_dict(unquantized)
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            get_method("gptq")(run_cfg).quantize(model, samples, Progress(enabled=False))
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            print(f"{args.dtype} norms {'replayed' if replay_norms else 'computed'}, rows in a "
                  f"{'reused' if reuse_rows else 'fresh'} buffer, run {repeat + 1}: {seconds:.2f} s, "
                  f"{after.ru_minflt - before.ru_minflt} page faults, sys {after.ru_stime - before.ru_stime:.2f} s, "
                  f"decoder {decoder_checksum(model)[:12]}", flush=True)
    sequential.untargeted_children, sequential.SequentialCalibration._row_buffer = norms, row_buffer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
