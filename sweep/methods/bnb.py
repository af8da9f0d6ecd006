"""bitsandbytes: data-free 4-bit (nf4 / fp4, optional double quantization) and 8-bit (LLM.int8) weights.

transformers quantizes while loading (`BitsAndBytesConfig`), so the in-memory model is saved and
reloaded through bitsandbytes; its kernels then run every forward pass (`weights=packed`).
bits must be 4 or 8: anything else is refused before a model is loaded. CUDA only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from sweep.backends import cuda_backend_errors, require
from sweep.backends.checkpoint import free_accelerator_memory, kernel_classes, save_for_backend, scratch_dir
from sweep.methods.base import PACKED, QuantMethod, QuantReport
from sweep.methods.rtn import planned_layers

BNB_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class BnbOptions:
    quant_type: str = "nf4"        # 4-bit data type: nf4 | fp4
    double_quant: bool = True      # quantize the 4-bit scales too (~0.4 bits/weight saved)
    compute_dtype: str = "float16"


class BitsAndBytes(QuantMethod):
    name = "bnb"
    knobs = frozenset({"bits"})
    Options = BnbOptions
    supported_bits = frozenset(BNB_BITS)   # 4: nf4/fp4, 8: LLM.int8
    ragged_groups = True                   # fixed 64-weight blocks over the flattened weight

    @classmethod
    def check_options(cls, cfg, options: BnbOptions) -> List[str]:
        errors = []
        if options.quant_type not in QUANT_TYPES:
            errors.append(f"method.quant_type={options.quant_type!r} is not allowed: one of {', '.join(QUANT_TYPES)}")
        if options.compute_dtype not in ("float16", "bfloat16", "float32"):
            errors.append(f"method.compute_dtype={options.compute_dtype!r} is not allowed: float16, bfloat16 or float32")
        return errors + cuda_backend_errors("method=bnb", cfg, "bitsandbytes", "bitsandbytes")

    def quantize(self, model, calibration, progress) -> QuantReport:
        require("bitsandbytes")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        cfg, opts = self.cfg, self.options
        device = str(next(model.parameters()).device)
        dtype = next(model.parameters()).dtype
        layers = planned_layers(model, cfg.bits, -1 if cfg.bits == 8 else 64, include_lm_head=False)
        if cfg.bits == 4:
            bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quant_type,
                                            bnb_4bit_use_double_quant=opts.double_quant,
                                            bnb_4bit_compute_dtype=getattr(torch, opts.compute_dtype))
            kind = f"{opts.quant_type}{' double-quant' if opts.double_quant else ''}"
        else:
            bnb_config = BitsAndBytesConfig(load_in_8bit=True)
            kind = "int8"
        source = save_for_backend(model, self.tokenizer, scratch_dir(self.workdir, "source"))
        model.to("meta")
        free_accelerator_memory()
        reloaded = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb_config,
                                                        device_map=device, dtype=dtype)
        reloaded.eval()
        packed_dir = scratch_dir(self.workdir, "packed")
        reloaded.save_pretrained(packed_dir, safe_serialization=True)
        return QuantReport(backend="bitsandbytes", weights=PACKED,
                           kernel=f"bnb {kind} ({', '.join(kernel_classes(reloaded))})",
                           layers=layers, model=reloaded, saved_dir=packed_dir)
