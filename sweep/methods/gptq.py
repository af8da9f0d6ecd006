"""GPTQ: second-order, error-compensating quantization from calibration activations.

Backend `torch` (the default on CPU) is this project's own implementation
(sweep/quant/gptq_solver.py): block by block through the model, each decoder layer sees the
outputs of the already-quantized layers before it (sequential), and within a layer the linears
are solved in execution order (true-sequential: q/k/v, then o, then gate/up, then down).
The result is quantize-dequantized weights (`weights=simulated`).

Backend `gptqmodel` (the default on CUDA when GPTQModel is installed) quantizes with GPTQModel,
saves the packed checkpoint, and reloads it on a low-bit kernel (`method.kernel`): the run then
measures the packed model (`weights=packed`). Bits GPTQModel cannot pack (1, 5, 6, 7) fall back
to the torch backend with `weights=simulated` and a note saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from sweep.backends import available, cuda_backend_errors
from sweep.backends.checkpoint import kernel_classes
from sweep.backends.cuda_int4 import KERNEL as GEMV
from sweep.backends.cuda_int4 import GemvInt4Linear
from sweep.backends.cuda_int4 import group_size_option_errors as gemv_group_size_errors
from sweep.backends.cuda_int4 import model_shape_errors as gemv_model_shape_errors
from sweep.backends.gptqmodel_backend import GPTQ_KERNEL_BITS, PACKED_GPTQ_BITS, gptq_kernel_for, quantize_and_reload
from sweep.backends.tinygemm import KERNEL as TINYGEMM
from sweep.backends.tinygemm import TinyGemmInt4Linear, weight_mismatch
from sweep.backends.tinygemm import group_size_option_errors as tinygemm_group_size_errors
from sweep.methods.base import PACKED, SIMULATED, MixedPrecisionOptions, QuantMethod, QuantReport
from sweep.methods.rtn import layer_record, planned_layers
from sweep.quant.gptq_solver import HessianAccumulator, gptq_quantize, packed_codes
from sweep.quant.layers import quantizable_linears
from sweep.quant.sequential import SequentialCalibration

BACKENDS = ("auto", "torch", "gptqmodel")
# Calibration tokens per layer pass where batching is exact (float32): 32 windows of 256.
EXACT_BATCH_TOKENS = 8192
KERNELS = ("auto",) + tuple(GPTQ_KERNEL_BITS)


@dataclass
class GPTQOptions(MixedPrecisionOptions):
    # auto: gptqmodel on CUDA when it is installed (and no layer_bits), else torch.
    backend: str = "auto"
    # GPTQModel kernel that runs the packed weights; auto picks one per bit width (gptqmodel_backend.py).
    kernel: str = "auto"
    block_size: int = 128
    true_sequential: bool = True
    static_groups: bool = False
    # Calibration batch size for GPTQModel.
    batch_size: int = 4
    # Torch backend: calibration samples go through each decoder layer in batches of up to this many
    # tokens (0 = one sample at a time). null = 8,192 (32 windows of 256) in float32, where a batch gives
    # every weight the bits of one sample at a time, twice as fast; one at a time in bfloat16/float16,
    # whose batched products round differently (as accurate per layer, yet GPTQ came out worse on WikiText-2
    # at W4 g32 on CPU over 6 seeds: docs/benchmarks.md).
    batch_tokens: Optional[int] = None
    # On tinygemm_int4: each attention's q/k/v and each MLP's gate/up as one int4 matmul (fewer,
    # larger matmuls decode faster at batch 1; same outputs, checked at load).
    fuse_projections: bool = True


class GPTQ(QuantMethod):
    name = "gptq"
    knobs = frozenset({"bits", "group_size", "sym", "damp_percent", "desc_act", "quantize_lm_head"})
    needs_calibration = True
    ragged_groups = True  # the torch grid gives a ragged last group its own scale
    Options = GPTQOptions

    @classmethod
    def check_options(cls, cfg, options: GPTQOptions) -> List[str]:
        errors = super().check_options(cfg, options)
        if options.backend not in BACKENDS:
            errors.append(f"method.backend={options.backend!r} is not allowed: backends are {', '.join(BACKENDS)}")
        if options.kernel not in KERNELS:
            errors.append(f"method.kernel={options.kernel!r} is not allowed: kernels are {', '.join(KERNELS)}")
        elif options.kernel != "auto" and cfg.bits not in GPTQ_KERNEL_BITS[options.kernel]:
            errors.append(f"method.kernel={options.kernel!r} cannot run bits={cfg.bits}: it packs bits "
                          f"{', '.join(map(str, GPTQ_KERNEL_BITS[options.kernel]))}")
        if options.kernel == TINYGEMM:
            errors += tinygemm_group_size_errors(cfg.group_size)
        if options.kernel == GEMV:
            errors += gemv_group_size_errors(cfg.group_size)
        if options.kernel in (TINYGEMM, GEMV) and cfg.desc_act:
            errors.append(f"desc_act=true is not allowed with method.kernel={options.kernel!r}: its groups must be "
                          "contiguous columns; use desc_act=false or another kernel")
        if options.backend == "gptqmodel":
            errors += cuda_backend_errors("method.backend='gptqmodel'", cfg, "gptqmodel", "GPTQModel",
                                          instead="; use method.backend=torch")
            if options.layer_bits:
                errors.append("method.layer_bits is not allowed with method.backend='gptqmodel' yet: "
                              "use method.backend=torch (or auto) for mixed precision")
            if cfg.damp_percent >= 1.0:
                errors.append(f"damp_percent={cfg.damp_percent!r} is not allowed with method.backend='gptqmodel': "
                              "it needs a fraction in (0, 1)")
        if options.block_size < 1:
            errors.append(f"method.block_size={options.block_size!r} is not allowed: at least 1")
        if options.batch_tokens is not None and options.batch_tokens < 0:
            errors.append(f"method.batch_tokens={options.batch_tokens!r} is not allowed: 0 (one sample at a time) or more")
        return errors

    @classmethod
    def kernel_shape_errors(cls, cfg, in_features: Dict[str, int]) -> List[str]:
        return gemv_model_shape_errors(cfg.method.get("kernel", "auto"), in_features, cfg.group_size, cfg.model.name)

    @classmethod
    def handles_ragged_groups(cls, cfg) -> bool:
        # tinygemm and gemv_int4 pack whole groups only; the other kernels and the torch grid take a ragged last group.
        return cls.ragged_groups and cfg.method.get("kernel", "auto") not in (TINYGEMM, GEMV)

    def resolved_backend(self, device: str) -> str:
        backend = self.options.backend
        if backend == "auto":
            # Per-layer bits run on the torch backend (GPTQModel's per-module `dynamic` config is not wired up).
            use_gptqmodel = device.startswith("cuda") and available("gptqmodel") and not self.options.layer_bits
            backend = "gptqmodel" if use_gptqmodel else "torch"
        return backend

    def quantize(self, model, calibration, progress) -> QuantReport:
        device = str(next(model.parameters()).device)
        if self.resolved_backend(device) == "gptqmodel":
            if self.cfg.bits in PACKED_GPTQ_BITS:
                return self._quantize_gptqmodel(model, calibration, device, progress)
            report = self._quantize_torch(model, calibration, progress)
            report.notes.append(f"GPTQModel packs bits {PACKED_GPTQ_BITS}, not {self.cfg.bits}: "
                                "quantized with the torch backend, weights simulated")
            return report
        return self._quantize_torch(model, calibration, progress)

    def _quantize_gptqmodel(self, model, calibration, device, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        layers = planned_layers(model, cfg.bits, cfg.group_size, include_lm_head=cfg.quantize_lm_head)
        kernel = gptq_kernel_for(cfg.bits, opts.kernel, cfg.group_size, cfg.desc_act,
                                 [record["in_features"] for record in layers.values()])
        progress.say(f"GPTQModel: {len(layers)} linears, kernel {kernel}")
        # GPTQModel 7.6 fails on the 8B shape's head ("Cannot move a module that still contains meta
        # tensors"); on the kernels the project packs itself the head is quantized here instead.
        own_head = cfg.quantize_lm_head and kernel in (TINYGEMM, GEMV)
        out = quantize_and_reload(
            model, self.tokenizer, calibration, self.workdir, device,
            dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                 damp_percent=cfg.damp_percent, true_sequential=opts.true_sequential,
                 lm_head=cfg.quantize_lm_head and not own_head),
            kernel=kernel, batch_size=opts.batch_size, progress=progress, fuse=opts.fuse_projections)
        report = QuantReport(backend="gptqmodel", weights=PACKED, layers=layers, model=out["model"],
                             saved_dir=out["saved_dir"])
        if own_head:
            progress.say(f"lm_head: GPTQ on the quantized model's final hidden states, packed for {kernel}")
            self.pack_lm_head(out["model"], calibration, kernel, report)
        report.kernel = f"{kernel} ({', '.join(kernel_classes(out['model']))})"
        return report

    @torch.no_grad()
    def pack_lm_head(self, model, calibration, kernel: str, report: QuantReport) -> None:
        """GPTQ of the LM head on the (already quantized) model's final hidden states over the calibration
        samples, the same solver as every other layer, its codes packed for `kernel` (tinygemm_int4 or
        gemv_int4) in place of the float head. A tied head is untied: the input embedding keeps its weights."""
        cfg = self.cfg
        head = model.get_output_embeddings()
        acc = HessianAccumulator(head.in_features, head.weight.device)
        handle = head.register_forward_pre_hook(lambda module, args: acc.add(args[0]))
        try:
            for ids in calibration:
                model(input_ids=ids.reshape(1, -1).to(head.weight.device), use_cache=False)
        finally:
            handle.remove()
        result = gptq_quantize(head.weight.data, acc.H, cfg.bits, cfg.group_size, cfg.sym, cfg.damp_percent)
        codes, scales, zeros = packed_codes(result, cfg.group_size)
        bias = getattr(head, "bias", None)
        if kernel == GEMV:
            packed = GemvInt4Linear(codes, scales, zeros, cfg.group_size, dtype=head.weight.dtype, bias=bias)
        else:
            packed = TinyGemmInt4Linear(codes, scales.t().contiguous(), zeros.t().contiguous(), cfg.group_size,
                                        bias=bias)
        # The packed head must compute GPTQ's weights.
        mismatch = weight_mismatch(packed, result.weight)
        if mismatch:
            raise RuntimeError(f"lm_head packed for {kernel} does not reproduce its GPTQ weights ({mismatch})")
        model.set_output_embeddings(packed)
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
        report.layers["lm_head"] = layer_record(head, cfg.bits, cfg.group_size, result.loss)
        report.notes.append(f"lm_head: GPTQ by the project's solver on the quantized model's outputs, packed for "
                            f"{kernel} in memory (GPTQModel quantized the other layers; its checkpoint on disk, "
                            "which disk_mb measures, keeps the float head)")

    @torch.no_grad()
    def _quantize_torch(self, model, calibration, progress) -> QuantReport:
        cfg, opts = self.cfg, self.options
        report = QuantReport(backend="sweep-torch", weights=SIMULATED)
        all_linears = quantizable_linears(model, include_lm_head=cfg.quantize_lm_head)
        self.plan = self.layer_plan(all_linears)
        batch_tokens = opts.batch_tokens
        if batch_tokens is None:
            batch_tokens = EXACT_BATCH_TOKENS if next(model.parameters()).dtype == torch.float32 else 0
        targets = {n: m for n, m in all_linears.items() if n != "lm_head"}
        sequence = SequentialCalibration(model, calibration, targets, opts.true_sequential, batch_tokens)
        for group in sequence.groups(progress, "gptq layers"):
            self._solve(group.linears, group.H, report)
        if "lm_head" in all_linears:
            self._quantize_lm_head(model, sequence.inputs, all_linears["lm_head"], report)
        return report

    def _solve(self, linears: Dict[str, torch.nn.Linear], H, report) -> None:
        """GPTQ for linears that share the Hessian H (one true-sequential group, or one linear).

        GPTQ treats every output row on its own, given H, so linears with the same bits and group
        size are solved as one stacked matrix: the same arithmetic per row, one column loop instead of
        three for q/k/v and one instead of two for gate/up (the loop's per-column overhead, not its
        arithmetic, is most of the solver's time on CPU)."""
        cfg, opts = self.cfg, self.options
        stacks: Dict[tuple, List[str]] = {}
        for name, linear in linears.items():
            setting = self.plan[name]
            if not setting.quantized:
                report.layers[name] = layer_record(linear, setting.bits, setting.group_size, 0.0)
            else:
                stacks.setdefault((setting.bits, setting.group_size), []).append(name)
        for (bits, group_size), names in stacks.items():
            weights = [linears[n].weight.data for n in names]
            result = gptq_quantize(torch.cat(weights) if len(weights) > 1 else weights[0], H, bits, group_size,
                                   cfg.sym, cfg.damp_percent, act_order=cfg.desc_act,
                                   static_groups=opts.static_groups, block_size=opts.block_size)
            start = 0
            for name in names:
                linear = linears[name]
                rows = slice(start, start + linear.out_features)
                start += linear.out_features
                linear.weight.data.copy_(result.weight[rows].to(linear.weight.dtype))
                report.layers[name] = layer_record(linear, bits, group_size, float(result.row_losses[rows].sum()))
                if result.damp_retries:
                    report.notes.append(f"{name}: damping raised {result.damp_retries}x to make H positive definite")

    def _quantize_lm_head(self, model, inputs, head, report) -> None:
        norm = getattr(getattr(model, "model", None), "norm", None)
        acc = HessianAccumulator(head.in_features, head.weight.device)
        for hidden in inputs.hidden:
            acc.add(norm(hidden) if norm is not None else hidden)
        self._solve({"lm_head": head}, acc.H, report)
