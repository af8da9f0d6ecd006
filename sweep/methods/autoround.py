"""AutoRound (Cheng et al. 2023, Intel auto-round): tuned rounding and clipping by signed gradient descent.

Needs auto-round and a GPU in practice (it runs on CPU too, slowly). `iters=0` is auto-round's
own RTN mode. The tuned model is exported in `export_format` and reloaded packed; bits that
format cannot pack run with simulated weights (auto-round's fake format), tagged as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from sweep.backends import available
from sweep.backends.autoround_backend import (AUTOROUND_KERNELS, GPTQ_PACKED_FORMATS, PACKED_BITS, SEQLEN_MARGIN,
                                              kernel_for, quantize_and_reload)
from sweep.backends.cuda_int4 import KERNEL as GEMV
from sweep.backends.cuda_int4 import group_size_option_errors as gemv_group_size_errors
from sweep.backends.cuda_int4 import model_shape_errors as gemv_model_shape_errors
from sweep.backends.gptqmodel_backend import GPTQ_KERNEL_BITS
from sweep.backends.tinygemm import KERNEL as TINYGEMM
from sweep.backends.tinygemm import group_size_option_errors as tinygemm_group_size_errors
from sweep.methods.base import PACKED, SIMULATED, QuantMethod, QuantReport
from sweep.methods.rtn import planned_layers

EXPORT_FORMATS = tuple(PACKED_BITS)
KERNELS = ("auto",) + tuple(AUTOROUND_KERNELS) + tuple(GPTQ_KERNEL_BITS)


def _kernel_bits_errors(bits: int, kernel: str, allowed) -> List[str]:
    if bits in allowed:
        return []
    return [f"bits={bits!r} is not allowed with method.kernel={kernel!r}: it runs bits {', '.join(map(str, allowed))}"]


@dataclass
class AutoRoundOptions:
    iters: int = 200               # tuning steps per block; 0 = auto-round's RTN mode
    lr: Optional[float] = None     # null: auto-round's default (1/iters)
    batch_size: int = 8
    export_format: str = "auto_round"   # auto_round | auto_gptq | auto_awq
    # auto: on CUDA autoround_triton (2/4/8 bits) or autoround_torch (3), kernels that need no compile
    # step; on CPU auto-round's own pick. autoround_triton / _torch / _marlin: that auto-round backend
    # (Marlin compiles for minutes per machine). A GPTQ kernel name (auto_gptq exports): loaded through
    # GPTQModel on that kernel, e.g. tinygemm_int4 (sweep/backends/tinygemm.py) or gptq_torch (any bits).
    kernel: str = "auto"
    # With kernel=tinygemm_int4: q/k/v and gate/up as one int4 matmul each (see GPTQOptions).
    fuse_projections: bool = True


class AutoRoundMethod(QuantMethod):
    name = "autoround"
    knobs = frozenset({"bits", "group_size", "sym", "quantize_lm_head"})
    needs_calibration = True
    Options = AutoRoundOptions

    @classmethod
    def kernel_shape_errors(cls, cfg, in_features: Dict[str, int]) -> List[str]:
        return gemv_model_shape_errors(cfg.method.get("kernel", "auto"), in_features, cfg.group_size, cfg.model.name)

    @classmethod
    def check_options(cls, cfg, options: AutoRoundOptions) -> List[str]:
        errors = []
        if options.iters < 0:
            errors.append(f"method.iters={options.iters!r} is not allowed: 0 (RTN mode) or more tuning steps")
        if options.batch_size < 1:
            errors.append(f"method.batch_size={options.batch_size!r} is not allowed: at least 1")
        if options.lr is not None and options.lr <= 0:
            errors.append(f"method.lr={options.lr!r} is not allowed: null (auto-round's default) or > 0")
        if options.export_format not in EXPORT_FORMATS:
            errors.append(f"method.export_format={options.export_format!r} is not allowed: "
                          f"formats are {', '.join(EXPORT_FORMATS)}")
        if options.kernel not in KERNELS:
            errors.append(f"method.kernel={options.kernel!r} is not allowed: kernels are {', '.join(KERNELS)}")
        elif options.kernel in AUTOROUND_KERNELS:
            errors += cls._autoround_kernel_errors(cfg, options)
        elif options.kernel != "auto":
            kernel = options.kernel
            if options.export_format != "auto_gptq":
                errors.append(f"method.kernel={kernel!r} needs method.export_format='auto_gptq', "
                              f"not {options.export_format!r}")
            errors += _kernel_bits_errors(cfg.bits, kernel, GPTQ_KERNEL_BITS[kernel])
            if kernel == TINYGEMM:
                errors += tinygemm_group_size_errors(cfg.group_size)
            if kernel == GEMV:
                errors += gemv_group_size_errors(cfg.group_size)
            if not available("gptqmodel"):
                errors.append(f"method.kernel={kernel!r} loads the export through GPTQModel, which is not "
                              "installed: pip install 'gptqmodel>=7.6'")
        if not available("auto_round"):
            errors.append("method=autoround needs auto-round, which is not installed: pip install 'auto-round>=0.16'")
        return errors

    @staticmethod
    def _autoround_kernel_errors(cfg, options: AutoRoundOptions) -> List[str]:
        kernel = options.kernel
        _, bits, devices = AUTOROUND_KERNELS[kernel]
        errors = []
        if options.export_format not in GPTQ_PACKED_FORMATS:
            errors.append(f"method.kernel={kernel!r} loads GPTQ-packed exports: method.export_format is one of "
                          f"{', '.join(GPTQ_PACKED_FORMATS)}, not {options.export_format!r} (or method.kernel=auto)")
        errors += _kernel_bits_errors(cfg.bits, kernel, bits)
        if cfg.device == "cpu" and "cpu" not in devices:
            errors.append(f"method.kernel={kernel!r} is not allowed with device=cpu: it runs on CUDA only "
                          "(autoround_torch or kernel=auto run on CPU)")
        return errors

    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        device = str(next(model.parameters()).device)
        layers = planned_layers(model, cfg.bits, cfg.group_size, include_lm_head=cfg.quantize_lm_head)
        kwargs = dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, iters=opts.iters,
                      nsamples=len(calibration), seqlen=max(8, int(calibration[0].numel()) - SEQLEN_MARGIN),
                      batch_size=min(opts.batch_size, len(calibration)), quant_lm_head=cfg.quantize_lm_head)
        if opts.lr is not None:
            kwargs["lr"] = opts.lr
        kernel = kernel_for(opts.kernel, device, cfg.bits, opts.export_format)
        progress.say(f"auto-round: {len(layers)} linears, iters={opts.iters}, export {opts.export_format}, "
                     f"kernel {kernel}")
        out = quantize_and_reload(model, self.tokenizer, calibration, self.workdir, device, kwargs, opts.export_format,
                                  kernel=kernel, fuse=opts.fuse_projections)
        report = QuantReport(backend="auto-round", weights=PACKED if out["packed"] else SIMULATED,
                             kernel=(f"{out['format'] if kernel == 'auto' else kernel} "
                                     f"({', '.join(out['kernel_classes']) or 'torch linear'})") if out["packed"] else "none",
                             layers=layers, model=out["model"], saved_dir=out["saved_dir"])
        if not out["packed"]:
            report.notes.append(f"{opts.export_format} packs bits {PACKED_BITS[opts.export_format]}, not {cfg.bits}: "
                                "exported in auto-round's fake format, weights simulated")
        return report
