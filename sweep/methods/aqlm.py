"""AQLM (Egiazarian et al., ICML 2024): additive quantization with learned codebooks, 1-2 bits and up.

Each linear's weights are cut into groups of `method.in_group_size` along the input; a group is the
sum of `num_codebooks` vectors, one from each codebook of 2**nbits_per_codebook, times its row's
scale. `bits` is the code bits per weight, num_codebooks * nbits_per_codebook / in_group_size, so
by default (8-wide groups, 8-bit codebooks) bits=2 means two codebooks: AQLM's "2x8" scheme.
The codebooks and scales add to that, reported in `quant.bits_per_weight` and `memory.weights_mb`.

The quantizer is this project's (sweep/quant/aqlm.py: residual k-means, beam search, Adam on the
layer's output error), fed layer by layer with calibration activations like GPTQ
(sweep/quant/sequential.py). The result is packed into the `aqlm` package's format, saved with
transformers' AqlmConfig and reloaded through transformers' AQLM integration onto aqlm's kernels
(sweep/backends/aqlm_backend.py), checked against the quantizer's own weights on load.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from sweep.backends import available, install_hint
from sweep.backends import aqlm_backend
from sweep.backends.checkpoint import scratch_dir
from sweep.methods.base import PACKED, MixedPrecisionOptions, QuantMethod, QuantReport, runs_on_cuda
from sweep.methods.rtn import layer_record
from sweep.quant.aqlm import AQLMSearch, AQLMSettings, aqlm_quantize
from sweep.quant.layer_bits import KEEP_BITS, parse_layer_bits
from sweep.quant.layers import quantizable_linears
from sweep.quant.sequential import SequentialCalibration

# RMS logit difference between the reloaded packed model and the quantizer's weights, relative to
# the logits' spread, that still counts as the same model (kernels round differently).
RELOAD_TOLERANCE = 0.05
# docs/benchmarks.md: with the defaults a linear of the embedded model takes ~15-25 s on 2 CPU cores
# (~4 s of the 1B shape's on the H200), so its 210 linears take about an hour on CPU.
CPU_REFUSAL = ("method=aqlm quantizes on a CUDA GPU: on CPU its beam search and codebook training take about an hour "
               "for the 30-layer embedded model on 2 cores (docs/benchmarks.md). Run it with device=cuda, or set "
               "method.allow_cpu=true to quantize on CPU anyway (a few modules via method.layer_bits, small models, "
               "tests)")


@dataclass
class AQLMOptions(MixedPrecisionOptions, AQLMSearch):
    # null: bits * in_group_size / nbits_per_codebook (bits=2 with the defaults: 2 codebooks, "2x8").
    num_codebooks: Optional[int] = None
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    true_sequential: bool = True
    allow_cpu: bool = False


class AQLM(QuantMethod):
    name = "aqlm"
    knobs = frozenset({"bits", "damp_percent"})
    needs_calibration = True
    Options = AQLMOptions

    @classmethod
    def num_codebooks(cls, bits: int, options: AQLMOptions) -> Optional[int]:
        if options.num_codebooks is not None:
            return options.num_codebooks
        codebooks = bits * options.in_group_size / options.nbits_per_codebook
        return int(codebooks) if codebooks == int(codebooks) and codebooks >= 1 else None

    @classmethod
    def input_group_size(cls, cfg) -> Optional[int]:
        """AQLM's groups must tile every quantized layer's in_features (checked against the model's shapes)."""
        return cls.parse_options(cfg.method).in_group_size

    @classmethod
    def check_options(cls, cfg, options: AQLMOptions) -> List[str]:
        errors = super().check_options(cfg, options)
        parsed, _ = parse_layer_bits(options.layer_bits)
        for pattern, entry in parsed.items():
            if entry.get("bits") not in (KEEP_BITS, cfg.bits) or "group_size" in entry:
                errors.append(f"method.layer_bits[{pattern!r}]={entry} is not allowed for method aqlm: only {KEEP_BITS} "
                              f"(leave the module unquantized) or bits={cfg.bits} (quantize it), since transformers' "
                              "AqlmConfig holds one codebook layout for the whole model")
        if options.nbits_per_codebook not in aqlm_backend.NBITS_RANGE:
            errors.append(f"method.nbits_per_codebook={options.nbits_per_codebook!r} is not allowed: 1 to 16")
        if options.in_group_size < 1:
            errors.append(f"method.in_group_size={options.in_group_size!r} is not allowed: at least 1")
        elif options.num_codebooks is not None:
            if options.num_codebooks < 1:
                errors.append(f"method.num_codebooks={options.num_codebooks!r} is not allowed: at least 1")
            elif options.num_codebooks * options.nbits_per_codebook != cfg.bits * options.in_group_size:
                errors.append(f"method.num_codebooks={options.num_codebooks} x nbits_per_codebook="
                              f"{options.nbits_per_codebook} / in_group_size={options.in_group_size} is "
                              f"{options.num_codebooks * options.nbits_per_codebook / options.in_group_size:g} bits per "
                              f"weight, not bits={cfg.bits}: set num_codebooks=null to derive it from bits")
        elif 1 <= options.nbits_per_codebook and cls.num_codebooks(cfg.bits, options) is None:
            errors.append(f"bits={cfg.bits} x in_group_size={options.in_group_size} is not a multiple of "
                          f"nbits_per_codebook={options.nbits_per_codebook}: no whole number of codebooks gives "
                          f"{cfg.bits} bits per weight")
        for field_name, value, least in (("rounds", options.rounds, 0), ("beam_size", options.beam_size, 1),
                                         ("kmeans_iters", options.kmeans_iters, 0),
                                         ("codebook_steps", options.codebook_steps, 0)):
            if value < least:
                errors.append(f"method.{field_name}={value!r} is not allowed: at least {least}")
        if not options.codebook_lr > 0:
            errors.append(f"method.codebook_lr={options.codebook_lr!r} is not allowed: a positive learning rate")
        if cfg.quantize_lm_head:
            errors.append("quantize_lm_head=true is not supported for method aqlm yet: use quantize_lm_head=false")
        if not runs_on_cuda(cfg.device) and not options.allow_cpu:
            errors.append(CPU_REFUSAL)
        if not available("aqlm"):
            errors.append(f"method=aqlm needs aqlm, which is not installed: {install_hint('aqlm')}")
        return errors

    def settings(self, seed: int) -> AQLMSettings:
        o = self.options
        search = {f.name: getattr(o, f.name) for f in fields(AQLMSearch)}
        return AQLMSettings(num_codebooks=self.num_codebooks(self.cfg.bits, o), nbits_per_codebook=o.nbits_per_codebook,
                            in_group_size=o.in_group_size, damp=self.cfg.damp_percent, seed=seed, **search)

    @torch.no_grad()
    def quantize(self, model, calibration, progress) -> QuantReport:
        cfg = self.cfg
        device = str(next(model.parameters()).device)
        dtype = next(model.parameters()).dtype
        linears = quantizable_linears(model)
        plan = self.layer_plan(linears)
        report = QuantReport(backend="sweep-aqlm", weights=PACKED)
        targets = {n: m for n, m in linears.items() if plan[n].quantized}
        for name in linears.keys() - targets.keys():
            report.layers[name] = layer_record(linears[name], KEEP_BITS, -1, 0.0)
        results = {}
        sequence = SequentialCalibration(model, calibration, targets, self.options.true_sequential)
        for group in sequence.groups(progress, "aqlm layers"):
            for name, linear in group.linears.items():
                # One seed per layer, from the run's: every layer's k-means starts differently, reproducibly.
                settings = self.settings(seed=cfg.seed * 100_003 + len(results))
                result = aqlm_quantize(linear.weight.data, group.H, settings)
                # Round codebooks and scales to the dtype the packed model stores them in, so that the
                # simulated weights below are the packed model's, bit for bit up to matmul order.
                result.codebooks = result.codebooks.to(dtype).float()
                result.scales = result.scales.to(dtype).float()
                # Later layers calibrate on this one's quantized output (the weights the packed model holds).
                linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
                results[name] = result
                report.layers[name] = dict(layer_record(linear, cfg.bits, settings.in_group_size, result.loss),
                                           initial_error=result.initial_loss)
        del sequence
        reference = self._logits(model, calibration)
        # Every other linear (lm_head, modules a plan keeps) stays as it is in the checkpoint.
        unquantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in targets]
        settings = self.settings(cfg.seed)
        for name, result in results.items():
            packed = aqlm_backend.packed_linear(targets[name], result.codes, result.codebooks, result.scales,
                                                settings.nbits_per_codebook, dtype)
            report.layers[name]["storage_bits"] = aqlm_backend.storage_bits(packed)
            model.set_submodule(name, packed)
        directory = scratch_dir(self.workdir or _temporary(), "packed")
        report.saved_dir = aqlm_backend.save(model, self.tokenizer, directory, settings.num_codebooks,
                                             settings.nbits_per_codebook, settings.in_group_size, unquantized)
        report.model = aqlm_backend.reload(directory, dtype, device)
        report.kernel = aqlm_backend.use_kernels(report.model, device)
        report.metrics["quant.reload_logit_error"] = self._check_reload(report.model, calibration, reference)
        report.metrics["quant.aqlm_num_codebooks"] = float(settings.num_codebooks)
        # The report reads group_size as a number: AQLM's is its input group; the layout goes in its own tag.
        report.tags["group_size"] = str(settings.in_group_size)
        report.tags["aqlm.layout"] = (f"{settings.num_codebooks}x{settings.nbits_per_codebook} "
                                      f"(codebooks x bits), groups of {settings.in_group_size}")
        return report

    @staticmethod
    def _logits(model, calibration) -> torch.Tensor:
        ids = calibration[0][:, :64].to(next(model.parameters()).device)
        return model(ids).logits.float()

    def _check_reload(self, model, calibration, reference: torch.Tensor) -> float:
        """RMS difference of the reloaded checkpoint's logits (aqlm's kernels) from the quantizer's own
        weights', relative to the logits' standard deviation; an error when the two disagree. (In
        bfloat16 the kernel rounds the sum of codebook vectors before scaling: ~1% here; a packing
        mistake gives ~100%.)"""
        difference = self._logits(model, calibration) - reference
        error = float(difference.pow(2).mean().sqrt() / reference.std())
        if error > RELOAD_TOLERANCE:
            raise RuntimeError(f"the AQLM checkpoint reloaded through transformers gives logits {error:.3g} standard "
                               f"deviations (RMS) away from the quantized weights' (tolerance {RELOAD_TOLERANCE}): "
                               "the packing or the kernel is wrong")
        return error


def _temporary() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="sweep-aqlm-")
