"""auto-round (Intel): sign-gradient tuning of rounding and clipping, exported packed and reloaded.

AutoRound quantizes the in-memory model, writes an export format (auto_round, auto_gptq or
auto_awq), and transformers reloads that checkpoint onto auto-round's kernels, so generation and
lm-eval run the packed weights. Bits without a packed kernel are exported in auto-round's
"fake" format (quantize-dequantized fp16 weights) and reported as simulated.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

from sweep.backends import require
from sweep.backends.checkpoint import drop_single_device_hooks, free_accelerator_memory, kernel_classes, scratch_dir
from sweep.quant.layers import quantizable_linears

SEQLEN_MARGIN = 8
PACKED_BITS = {"auto_round": (2, 3, 4, 8), "auto_gptq": (2, 3, 4, 8), "auto_awq": (4,)}

# auto-round's own inference backends, chosen by `method.kernel` and passed to the reload as
# transformers' AutoRoundConfig(backend=...): name there, bits it runs, devices. They load GPTQ-packed
# exports (auto_round, auto_gptq); auto_awq exports keep auto-round's own choice (kernel=auto).
AUTOROUND_KERNELS = {
    "autoround_triton": ("triton", (2, 4, 8), ("cuda",)),
    "autoround_torch": ("torch", (2, 3, 4, 8), ("cuda", "cpu")),
    "autoround_marlin": ("marlin", (4, 8), ("cuda",)),
}
GPTQ_PACKED_FORMATS = ("auto_round", "auto_gptq")


def kernel_for(kernel: str, device: str, bits: int, export_format: str) -> str:
    """What `method.kernel=auto` loads the export on. On CUDA a kernel that needs no compile step:
    auto-round's own pick there is GPTQModel's Marlin, which compiles for minutes on each new machine and
    killed every process (SIGSEGV) at its first forward on the H200 (docs/benchmarks.md, ninth visit);
    Triton where it runs the bits, else the torch kernel. Elsewhere (CPU) auto-round's own pick."""
    if kernel != "auto" or not device.startswith("cuda") or export_format not in GPTQ_PACKED_FORMATS:
        return kernel
    return "autoround_triton" if bits in AUTOROUND_KERNELS["autoround_triton"][1] else "autoround_torch"


def calibration_texts(tokenizer, samples: List[torch.Tensor]) -> List[str]:
    # AutoRound tokenizes its dataset itself and drops texts shorter than seqlen tokens; the
    # run's samples are exactly the calibration seqlen long, and the method asks AutoRound for a
    # few tokens less (SEQLEN_MARGIN) so that re-tokenizing the decoded text cannot fall short.
    return [tokenizer.decode(s.reshape(-1), skip_special_tokens=True) for s in samples]


def _checkpoint_dir(out_dir: str) -> str:
    """auto-round may write the checkpoint into a subfolder named after the scheme: find it."""
    found = sorted(Path(out_dir).rglob("config.json"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"auto-round wrote no config.json under {out_dir}")
    return str(found[0].parent)


def _first_linear_weight(model):
    """One decoder linear's name and a CPU copy of its weight, to compare a fake export against."""
    name, linear = next(iter(quantizable_linears(model).items()))
    return name, linear.weight.detach().to("cpu", copy=True)


def _check_fake_export_is_quantized(reloaded, name, original) -> None:
    """auto-round 0.16.1's fake export of a float32 model writes the original float32 weights back
    ("Restored ... to their original FP32 values"), so the reloaded model is not quantized at all.
    Fail loudly instead of reporting fp32 quality as quantized."""
    weight = reloaded.get_submodule(name).weight.detach().to("cpu")
    if torch.equal(weight, original.to(weight.dtype)):
        raise RuntimeError(
            f"auto-round's fake export kept {name}'s original weights: the reloaded model is not quantized "
            f"(auto-round restores float32 tensors on save). Use bits its export format packs "
            f"({PACKED_BITS}) or a float16 model on a GPU")


def reload(out_dir: str, device: str, kernel: str, bits: int, fuse: bool = False):
    """The exported checkpoint in `out_dir`, loaded for inference on `kernel` (see kernel_for)."""
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    if kernel != "auto" and kernel not in AUTOROUND_KERNELS:
        # A GPTQ-format export runs on any GPTQ kernel (method.kernel), loaded through GPTQModel.
        from sweep.backends.gptqmodel_backend import load_packed

        return load_packed(out_dir, device, kernel, fuse=fuse)
    loading = {}
    if kernel in AUTOROUND_KERNELS:
        # Only the backend is taken from this config; the rest comes from the checkpoint's own.
        loading["quantization_config"] = AutoRoundConfig(bits=bits, backend=AUTOROUND_KERNELS[kernel][0])
    with warnings.catch_warnings():
        # transformers warns that the checkpoint's own config wins except for the backend: what is meant here.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, device_map=device, dtype=torch.float16, **loading)
    drop_single_device_hooks(reloaded)
    return reloaded.eval()


def quantize_and_reload(model, tokenizer, samples, workdir: str, device: str, kwargs: Dict[str, Any],
                        export_format: str, kernel: str = "auto", fuse: bool = False) -> Dict[str, Any]:
    require("auto_round")
    from auto_round import AutoRound

    packed = kwargs["bits"] in PACKED_BITS.get(export_format, ())
    fmt = export_format if packed else "fake"
    # Only a fake export needs the check; taken before auto-round tunes the model in place.
    probe_name, probe = (None, None) if packed else _first_linear_weight(model)
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer=tokenizer, dataset=calibration_texts(tokenizer, samples),
                        device_map=device if device != "cuda" else 0, **kwargs)
    out_dir = scratch_dir(workdir, f"autoround-{fmt}")
    rounder.quantize_and_save(out_dir, format=fmt)
    seconds = time.perf_counter() - start
    out_dir = _checkpoint_dir(out_dir)
    del rounder
    model.to("meta")
    free_accelerator_memory()
    reloaded = reload(out_dir, device, kernel if packed else "auto", kwargs["bits"], fuse)
    if not packed:
        _check_fake_export_is_quantized(reloaded, probe_name, probe)
    return {"model": reloaded, "saved_dir": out_dir, "format": fmt, "packed": packed,
            "kernel_classes": kernel_classes(reloaded), "seconds": seconds}
