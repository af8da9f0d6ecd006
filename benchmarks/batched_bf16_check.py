"""Is batched bfloat16 calibration less accurate than one window at a time, or just rounded differently?

    python benchmarks/batched_bf16_check.py [NSAMPLES] [SEED] [stream]   # default 32 windows of 256, seed 0

(`stream`: only the streams' errors, a third of the time.)

Loads the embedded model in bfloat16 and a float32 copy of the very same weights (the reference), draws
the default calibration windows, and runs them through the unquantized decoder layer by layer three ways:
bfloat16 one window at a time (`method.batch_tokens=0`), bfloat16 batched (8,192 tokens a pass, the
float32 default) and float32 (batched and one-at-a-time are bit for bit equal there). Per layer it prints,
against the float32 reference:

- `local`: the layer's output error when all three get the same input (the reference's, rounded to
  bfloat16), relative Frobenius norm, for one window at a time and batched;
- `bias`: the mean of (output − reference) over tokens, relative to the output's RMS: a bug in masks,
  positions or rotary embeddings would show as an error that does not average out; rounding does;
- `H`: the relative Frobenius error of each true-sequential group's Hessian (q/k/v input, o input,
  gate/up input, down input) accumulated exactly as GPTQ does (HessianAccumulator, the hooks of
  sweep/quant/sequential.py), worst of the four;
- `stream`: the error of each path's own hidden states after the layer (errors carried from earlier
  layers included).

Equal error sizes mean batching only rounds differently; a systematically larger error would be a bug.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep.config.schema import SweepConfig  # noqa: E402
from sweep.data.calibration import build_samples  # noqa: E402
from sweep.infra.hardware import configure_threads  # noqa: E402
from sweep.models.loading import load_model  # noqa: E402
from sweep.quant.gptq_solver import HessianAccumulator  # noqa: E402
from sweep.quant.layers import LayerInputs, capture_first_layer_inputs, decoder_layers, run_layer  # noqa: E402

GROUPS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "mlp": "mlp.gate_proj", "down": "mlp.down_proj"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def layer_pass(layer, inputs: LayerInputs):
    """Outputs (one tensor per entry) and the four groups' Hessians, as GPTQ's hooks accumulate them."""
    hessians, handles = {}, []
    for key, name in GROUPS.items():
        linear = layer.get_submodule(name)
        hessians[key] = HessianAccumulator(linear.in_features, linear.weight.device)
        handles.append(linear.register_forward_pre_hook(lambda m, args, k=key: hessians[k].add(args[0])))
    try:
        outs = run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]), {k: h.H for k, h in hessians.items()}


def split(flat: torch.Tensor, like: LayerInputs) -> list:
    """Rows of `flat` (tokens × features) cut into entries shaped like `like.hidden`."""
    out, start = [], 0
    for h in like.hidden:
        n = h.shape[0] * h.shape[1]
        out.append(flat[start:start + n].reshape(h.shape))
        start += n
    return out


def local_errors(layer_ref, layer_bf, ref: LayerInputs, single: LayerInputs, batched: LayerInputs):
    """One layer's errors against the reference when all three paths get the same input: the reference
    stream rounded to bfloat16."""
    common = LayerInputs(hidden=[h.to(torch.bfloat16) for h in ref.hidden], kwargs=ref.kwargs)
    common_single = LayerInputs(hidden=split(torch.cat([h.reshape(-1, h.shape[-1]) for h in common.hidden]), single),
                                kwargs=single.kwargs)
    common_batched = LayerInputs(hidden=common.hidden, kwargs=batched.kwargs)
    common_ref = LayerInputs(hidden=[h.float() for h in common.hidden], kwargs=ref.kwargs)
    out_ref, H_ref = layer_pass(layer_ref, common_ref)
    out_s, H_s = layer_pass(layer_bf, common_single)
    out_b, H_b = layer_pass(layer_bf, common_batched)
    scale = out_ref.pow(2).mean().sqrt() * out_ref.shape[1] ** 0.5
    bias_s = float((out_s.float() - out_ref).mean(0).norm() / scale)
    bias_b = float((out_b.float() - out_ref).mean(0).norm() / scale)
    hs = max(rel(H_s[k], H_ref[k]) for k in GROUPS)
    hb = max(rel(H_b[k], H_ref[k]) for k in GROUPS)
    return rel(out_s, out_ref), rel(out_b, out_ref), bias_s, bias_b, hs, hb, rel(out_s, out_b)


@torch.no_grad()
def main() -> None:
    nsamples = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    stream_only = len(sys.argv) > 3 and sys.argv[3] == "stream"
    configure_threads()
    cfg = SweepConfig()
    cfg.model.dtype = "bfloat16"
    cfg.calibration.nsamples, cfg.calibration.seqlen, cfg.calibration.seed = nsamples, 256, seed
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    reference = copy.deepcopy(model).float()
    samples = build_samples(tokenizer, cfg.calibration)
    single = capture_first_layer_inputs(model, samples, 0)
    batched = capture_first_layer_inputs(model, samples, nsamples * 256)
    ref = capture_first_layer_inputs(reference, samples, nsamples * 256)
    print(f"{nsamples} windows, seed {seed}, {torch.get_num_threads()} threads; entries: one-at-a-time "
          f"{len(single.hidden)}, batched {len(batched.hidden)} of {tuple(batched.hidden[0].shape)}")
    for name, inputs in (("single", single), ("batched", batched)):
        kw = inputs.kwargs[0]
        print(f"  {name} layer kwargs:", {k: (tuple(v.shape) if torch.is_tensor(v) else
                                              [tuple(t.shape) for t in v] if isinstance(v, tuple) else v)
                                          for k, v in kw.items()})
    first = torch.cat([h.reshape(-1, h.shape[-1]) for h in single.hidden])
    print("  first-layer inputs equal (single vs batched):",
          torch.equal(first, torch.cat([h.reshape(-1, h.shape[-1]) for h in batched.hidden])))
    print("layer | local single | local batched | bias single | bias batched | H single (worst) | H batched (worst)"
          " | stream single | stream batched | single≠batched (local) | single≠batched (stream)")
    sums = {k: 0.0 for k in ("ls", "lb", "hs", "hb", "ss", "sb", "sd")}
    layers_bf, layers_ref = decoder_layers(model), decoder_layers(reference)
    for index in range(len(layers_bf)):
        ls = lb = bias_s = bias_b = hs = hb = local_diff = float("nan")
        if not stream_only:
            ls, lb, bias_s, bias_b, hs, hb, local_diff = local_errors(layers_ref[index], layers_bf[index],
                                                                      ref, single, batched)
        # Each path's own stream (its errors from earlier layers carried along).
        ref.hidden = run_layer(layers_ref[index], ref)
        single.hidden = run_layer(layers_bf[index], single)
        batched.hidden = run_layer(layers_bf[index], batched)
        flat_ref, flat_s, flat_b = (torch.cat([h.reshape(-1, h.shape[-1]) for h in x.hidden])
                                    for x in (ref, single, batched))
        ss, sb, sd = rel(flat_s, flat_ref), rel(flat_b, flat_ref), rel(flat_s, flat_b)
        for k, v in zip(sums, (ls, lb, hs, hb, ss, sb, sd)):
            sums[k] += v
        print(f"{index:5d} | {ls:.3e} | {lb:.3e} | {bias_s:.2e} | {bias_b:.2e} | {hs:.3e} | {hb:.3e} | {ss:.3e} | "
              f"{sb:.3e} | {local_diff:.2e} | {sd:.2e}")
    n = len(layers_bf)
    print("mean  | " + " | ".join(f"{v / n:.3e}" for v in sums.values()))


if __name__ == "__main__":
    main()
