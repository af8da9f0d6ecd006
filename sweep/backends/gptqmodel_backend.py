"""GPTQModel (the maintained successor of AutoGPTQ): quantize from a checkpoint, save packed, reload on a kernel.

Used by the `gptq` method (backend=gptqmodel) and the `awq` method. GPTQModel works from a
directory, so the in-memory model is saved first (sweep/backends/checkpoint.py); the packed
checkpoint it writes is then loaded back through the named kernel and replaces the run's model,
so generation, lm-eval and memory are measured on the real low-bit kernels.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List

import torch

from sweep.backends import require
from sweep.backends.checkpoint import (
    drop_single_device_hooks,
    free_accelerator_memory,
    kernel_classes,
    save_for_backend,
    scratch_dir,
)
from sweep.backends.cuda_int4 import KERNEL as GEMV
from sweep.backends.tinygemm import KERNEL as TINYGEMM
from sweep.backends.tinygemm import fits as tinygemm_fits

log = logging.getLogger(__name__)

# Bits each GPTQModel kernel packs (seen on GPTQModel 7.6 on an H100; docs/benchmarks.md).
GPTQ_KERNEL_BITS = {
    "gptq_triton": (2, 4, 8),
    "gptq_torch": (2, 3, 4, 8),
    "gptq_exllama_v2": (4,),
    "gptq_marlin": (4, 8),      # built for batch-1 decode; its CUDA code compiles on first use (~4 min);
                                # its compiled decode broke 54 times on an H100 (docs/benchmarks.md)
    TINYGEMM: (4,),             # PyTorch's own int4 matmul (sweep/backends/tinygemm.py), loaded via gptq_torch
    GEMV: (4,),                 # the project's CUDA int4 GEMV for batch-1 decode (sweep/backends/cuda_int4.py),
                                # built with the machine's nvcc on first use; loaded via gptq_torch
}
AWQ_KERNEL_BITS = {"awq_gemm_triton": (4,), "awq_torch": (4,), "awq_gemm": (4,), "awq_marlin": (4,)}
PACKED_GPTQ_BITS = (2, 3, 4, 8)
# "auto" in this project means a kernel that needs neither a download nor a long compile:
# GPTQModel's own BACKEND.AUTO may try to fetch prebuilt kernels, which fails offline.
# 4-bit: tinygemm where its groups fit (on the H100 its matmul beats bf16 on every 8B shape, 1.7-2.5x,
# and it decodes at least as fast as Triton: docs/benchmarks.md), else Triton: exllama_v2 refuses
# in_features not divisible by group_size (576 vs 128 in the embedded model) and its custom op
# breaks the compiled static-cache decode (4 tokens/s on the 1B shape vs 47 eager).
DEFAULT_GPTQ_KERNEL = {2: "gptq_triton", 3: "gptq_torch", 4: "gptq_triton", 8: "gptq_triton"}
DEFAULT_AWQ_KERNEL = "awq_gemm_triton"


def gptq_kernel_for(bits: int, kernel: str, group_size: int = 128, desc_act: bool = False,
                    in_features=()) -> str:
    """The kernel a run uses: the named one, or for `auto` the fastest that takes these weights."""
    if kernel != "auto":
        return kernel
    if bits == 4 and tinygemm_fits(group_size, desc_act, in_features):
        return TINYGEMM
    return DEFAULT_GPTQ_KERNEL[bits]


def calibration_records(samples: List[torch.Tensor]) -> List[Dict[str, List[int]]]:
    records = []
    for sample in samples:
        ids = sample.reshape(-1).tolist()
        records.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return records


def quantize_and_reload(model, tokenizer, samples, workdir: str, device: str, quant_kwargs: Dict[str, Any],
                        kernel: str, batch_size: int = 4, progress=None, fuse: bool = False) -> Dict[str, Any]:
    """Save `model`, quantize the checkpoint with GPTQModel, save packed, reload on `kernel`.

    Returns {"model", "saved_dir", "kernel", "kernel_classes", "seconds"}; the caller should drop
    its reference to `model` (this function frees the accelerator copy before quantizing).
    """
    require("gptqmodel")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(4, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig

    source = save_for_backend(model, tokenizer, scratch_dir(workdir, "source"))
    model.to("meta")  # the run keeps its handle, but the weights leave the accelerator
    free_accelerator_memory()
    start = time.perf_counter()
    qmodel = GPTQModel.load(source, QuantizeConfig(**quant_kwargs), device=device)
    if progress is not None:
        progress.say(f"GPTQModel loaded the checkpoint; quantizing on {len(samples)} calibration samples")
    qmodel.quantize(calibration_records(samples), batch_size=batch_size)
    packed_dir = scratch_dir(workdir, "packed")
    qmodel.save(packed_dir)
    seconds = time.perf_counter() - start
    del qmodel
    free_accelerator_memory()
    hf_model = load_packed(packed_dir, device, kernel, fuse=fuse)
    return {"model": hf_model, "saved_dir": packed_dir, "kernel": kernel,
            "kernel_classes": kernel_classes(hf_model), "seconds": seconds}


def load_packed(packed_dir: str, device: str, kernel: str, fuse: bool = False):
    """A GPTQ-format checkpoint loaded for inference on `kernel` (the transformers model).

    fuse: on tinygemm_int4 and gemv_int4, run each attention's q/k/v and each MLP's gate/up as one
    matmul (sweep/backends/tinygemm_fusion.py); other kernels ignore it."""
    require("gptqmodel")
    from gptqmodel import GPTQModel

    if kernel == GEMV:
        from sweep.backends import cuda_int4
        from sweep.backends.tinygemm import convert_model

        model = GPTQModel.load(packed_dir, device=device, backend="gptq_torch").model
        dtype = next((b.dtype for b in model.buffers() if b.is_floating_point()), torch.bfloat16)
        convert_model(model, check_with=lambda module: module.dequantize_weight(),
                      build=lambda module: cuda_int4.from_gptq_module(module, dtype), kernel=GEMV)
        if fuse:
            from sweep.backends.tinygemm_fusion import fuse_projections

            log.info("fused projections: %s", fuse_projections(
                model, fusable=cuda_int4.is_gemv_layer, concatenate=cuda_int4.GemvInt4Linear.concatenate,
                probe_ids=cuda_int4.one_token_probe(model)))
        free_accelerator_memory()
    elif kernel == TINYGEMM:
        from sweep.backends.tinygemm import convert_model

        # GPTQModel's pure-torch layers unpack the checkpoint (incl. its zero-point format);
        # their buffers then move onto tinygemm, checked against GPTQModel's own dequantization.
        model = GPTQModel.load(packed_dir, device=device, backend="gptq_torch").model
        convert_model(model, check_with=lambda module: module.dequantize_weight())
        if fuse:
            from sweep.backends.tinygemm_fusion import fuse_projections

            log.info("fused projections: %s", fuse_projections(model))
        free_accelerator_memory()
    else:
        model = GPTQModel.load(packed_dir, device=device, backend=kernel).model
    removed = drop_single_device_hooks(model)
    if removed:
        log.info("removed %d single-device dispatch hooks (they break the compiled decode)", removed)
    model.eval()
    return model
