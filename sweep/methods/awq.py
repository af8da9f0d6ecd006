"""AWQ (Lin et al. 2023): activation-aware per-channel scaling before 4-bit rounding.

AutoAWQ is deprecated; its maintainers point to GPTQModel, which now carries AWQ quantization
and kernels, so this method runs GPTQModel's AWQ and reloads the packed GEMM checkpoint.
4-bit only: other bits are refused before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from sweep.backends import cuda_backend_errors
from sweep.backends.gptqmodel_backend import AWQ_KERNEL_BITS, DEFAULT_AWQ_KERNEL, quantize_and_reload
from sweep.methods.base import PACKED, QuantMethod, QuantReport
from sweep.methods.rtn import planned_layers

AWQ_BITS = (4,)
KERNELS = ("auto",) + tuple(AWQ_KERNEL_BITS)


@dataclass
class AWQOptions:
    kernel: str = "auto"        # auto = awq_gemm_triton (no compile, no download)
    batch_size: int = 4


class AWQ(QuantMethod):
    name = "awq"
    knobs = frozenset({"bits", "group_size", "sym"})
    needs_calibration = True
    Options = AWQOptions
    supported_bits = frozenset(AWQ_BITS)   # GPTQModel's AWQ GEMM kernels are 4-bit

    @classmethod
    def check_options(cls, cfg, options: AWQOptions) -> List[str]:
        errors = []
        if options.kernel not in KERNELS:
            errors.append(f"method.kernel={options.kernel!r} is not allowed: kernels are {', '.join(KERNELS)}")
        return errors + cuda_backend_errors("method=awq", cfg, "gptqmodel", "GPTQModel's AWQ")

    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        device = str(next(model.parameters()).device)
        kernel = DEFAULT_AWQ_KERNEL if opts.kernel == "auto" else opts.kernel
        layers = planned_layers(model, cfg.bits, cfg.group_size, include_lm_head=False)
        out = quantize_and_reload(
            model, self.tokenizer, calibration, self.workdir, device,
            dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, quant_method="awq", format="gemm"),
            kernel=kernel, batch_size=opts.batch_size, progress=progress)
        return QuantReport(backend="gptqmodel-awq", weights=PACKED, kernel=f"{kernel} ({', '.join(out['kernel_classes'])})",
                           layers=layers, model=out["model"], saved_dir=out["saved_dir"])
