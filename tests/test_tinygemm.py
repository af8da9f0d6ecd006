"""tinygemm_int4: GPTQ-packed 4-bit weights on PyTorch's int4 matmul (sweep/backends/tinygemm.py).

The kernel runs on CPU as well (aten._weight_int4pack_mm_for_cpu), so the conversion, the
numerics and the refusals are checked here; the GPU run is in docs/benchmarks.md.
"""
import pytest
import torch
from torch import nn

from sweep.backends.gptqmodel_backend import gptq_kernel_for
from sweep.backends.tinygemm import TinyGemmError, TinyGemmInt4Linear, convert_model, unpack_gptq
from sweep.config.schema import ConfigError
from sweep.validation.fields import validate
from sweep.measure.latency import _compile_gate_lifted
from sweep.validation.model_fit import check_against_model
from conftest import make_config


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor):
    """GPTQ's int32 layout, written out nibble by nibble (independent of the converter's unpacking)."""
    out_features, in_features = codes.shape
    qweight = torch.zeros(in_features // 8, out_features, dtype=torch.int64)
    for i in range(8):
        qweight |= codes.t()[i::8].to(torch.int64) << (4 * i)
    qzeros = torch.zeros(zeros.shape[0], out_features // 8, dtype=torch.int64)
    for j in range(8):
        qzeros |= zeros[:, j::8].to(torch.int64) << (4 * j)
    # int32 words as GPTQ stores them (bit 31 set = negative)
    return qweight.to(torch.int32), qzeros.to(torch.int32)


class FakeGPTQLinear(nn.Module):
    """The buffers a GPTQModel quant-linear holds in memory (v2 zero points)."""

    def __init__(self, codes, scales, zeros, group_size, bits=4, g_idx=None):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = codes.shape
        qweight, qzeros = pack_gptq(codes, zeros)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales.half())
        groups = torch.arange(self.in_features) // group_size if g_idx is None else g_idx
        self.register_buffer("g_idx", groups.to(torch.int32))
        self.bias = None


def random_layer(out_features=96, in_features=576, group_size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen)
    zeros = torch.randint(0, 16, (groups, out_features), generator=gen)
    scales = torch.rand(groups, out_features, generator=gen) * 0.02 + 1e-3
    groups_of = torch.arange(in_features) // group_size
    weight = (scales.half().float()[groups_of] * (codes.t().float() - zeros.float()[groups_of])).t()
    return codes, scales, zeros, weight


def test_unpack_reads_gptq_packing_back():
    codes, scales, zeros, _ = random_layer()
    qweight, qzeros = pack_gptq(codes, zeros)
    got_codes, got_zeros = unpack_gptq(qweight, qzeros, scales, codes.shape[1])
    assert torch.equal(got_codes, codes.to(got_codes.dtype))
    assert torch.equal(got_zeros, zeros.to(got_zeros.dtype))


@pytest.mark.parametrize("group_size", [32, 64])
def test_kernel_matches_the_gptq_weights(group_size):
    codes, scales, zeros, weight = random_layer(group_size=group_size)
    bias = torch.randn(codes.shape[0])
    layer = TinyGemmInt4Linear(codes, scales.half(), zeros, group_size, bias=bias)
    x = torch.randn(2, 3, codes.shape[1])
    expected = x @ weight.t() + bias
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    # bfloat16 activations and scales: ~0.4% per value, accumulated over 576 inputs
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    # off-by-one zero points would shift every weight by a whole scale step
    shifted = x @ (weight - scales.half().float()[torch.arange(576) // group_size].t()).t() + bias
    assert (got - shifted).abs().max() > 0.05 * expected.abs().max()


def test_convert_model_replaces_gptq_layers_and_keeps_outputs():
    codes, scales, zeros, weight = random_layer()
    model = nn.Sequential(FakeGPTQLinear(codes, scales, zeros, 32), nn.ReLU())
    x = torch.randn(4, 576)
    expected = torch.relu(x @ weight.t())
    stats = convert_model(model, check_with=lambda m: weight.t())  # the library's [in, out] dequantization
    assert stats == {"converted": 1} and isinstance(model[0], TinyGemmInt4Linear)
    assert (model(x) - expected).abs().max() < 0.02 * expected.abs().max()


def test_convert_model_refuses_a_checkpoint_it_reads_differently():
    codes, scales, zeros, weight = random_layer()
    model = nn.Sequential(FakeGPTQLinear(codes, scales, zeros, 32))
    groups_of = torch.arange(576) // 32
    v1_weight = (scales.half().float()[groups_of] * (codes.t().float() - zeros.float()[groups_of] - 1)).t()
    with pytest.raises(TinyGemmError, match="does not reproduce"):
        convert_model(model, check_with=lambda m: v1_weight.t())


@pytest.mark.parametrize("case, message", [
    ("group16", "group_size 16"),
    ("act_order", "act-order"),
    ("bits3", "4-bit weights only"),
    ("ragged", "not divisible by group_size"),
])
def test_layers_the_kernel_cannot_run_are_refused_by_name(case, message):
    if case == "ragged":
        codes, scales, zeros, _ = random_layer(in_features=576, group_size=64)
        module = FakeGPTQLinear(codes, scales, zeros, 128, g_idx=torch.arange(576) // 128)
    else:
        group = 16 if case == "group16" else 32
        codes, scales, zeros, _ = random_layer(group_size=group)
        g_idx = torch.randperm(576) // group if case == "act_order" else None
        module = FakeGPTQLinear(codes, scales, zeros, group, bits=3 if case == "bits3" else 4, g_idx=g_idx)
    model = nn.Sequential(module)
    with pytest.raises(TinyGemmError, match=message) as info:
        convert_model(model)
    assert "0:" in str(info.value) or "4-bit" in str(info.value)  # the layer's name leads the message


def test_auto_kernel_picks_tinygemm_only_where_it_fits():
    assert gptq_kernel_for(4, "auto", 128, False, [2048, 8192]) == "tinygemm_int4"
    assert gptq_kernel_for(4, "auto", 128, False, [576, 1536]) == "gptq_triton"   # ragged last group
    assert gptq_kernel_for(4, "auto", 128, True, [2048, 8192]) == "gptq_triton"   # act-order
    assert gptq_kernel_for(4, "auto", 16, False, [2048]) == "gptq_triton"
    assert gptq_kernel_for(3, "auto", 128, False, [2048]) == "gptq_torch"
    assert gptq_kernel_for(4, "gptq_marlin", 128, False, [2048]) == "gptq_marlin"


def errors_of(*overrides):
    with pytest.raises(ConfigError) as info:
        validate(make_config(*overrides))
    return str(info.value)


def test_config_errors_name_the_field_and_the_allowed_values():
    message = errors_of("method=gptq", "method.kernel=tinygemm_int4", "group_size=16", "desc_act=true")
    assert "group_size=16" in message and "32, 64, 128, 256" in message and "desc_act=true" in message
    assert "cannot run bits=3" in errors_of("method=gptq", "method.kernel=tinygemm_int4", "bits=3")
    message = errors_of("method=autoround", "method.kernel=tinygemm_int4", "method.export_format=auto_round")
    assert "method.export_format='auto_gptq'" in message
    message = errors_of("method=autoround", "method.kernel=tinygemm_int4", "method.export_format=auto_gptq", "bits=3")
    assert "bits=3 is not allowed with method.kernel='tinygemm_int4': it runs bits 4" in message
    # gptq_torch runs 3-bit: any error left is only about libraries missing here
    try:
        validate(make_config("method=autoround", "method.kernel=gptq_torch", "method.export_format=auto_gptq", "bits=3"))
    except ConfigError as err:
        assert "is not allowed" not in str(err)


def test_ragged_groups_are_refused_before_loading_only_for_this_kernel(embedded_model_dir):
    # the embedded model's hidden size is 576: 128-column groups leave a ragged last group
    with pytest.raises(ConfigError) as info:
        check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "method.kernel=tinygemm_int4",
                                        "group_size=128"))
    assert "group_size=128 does not divide" in str(info.value) and "576" in str(info.value)
    check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "method.kernel=tinygemm_int4",
                                    "group_size=32"))
    # the other kernels and the torch grid take a ragged last group
    check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "group_size=128"))


class _Quantizer:
    def __init__(self, compileable):
        self.is_compileable = compileable


def test_static_mode_lifts_the_quantizer_compile_gate_and_restores_it():
    model = nn.Linear(2, 2)
    model.hf_quantizer = _Quantizer(False)
    with pytest.raises(RuntimeError):
        with _compile_gate_lifted(model):
            assert model.hf_quantizer is None
            raise RuntimeError("generate failed")
    assert isinstance(model.hf_quantizer, _Quantizer)
    compileable = _Quantizer(True)
    model.hf_quantizer = compileable
    with _compile_gate_lifted(model):
        assert model.hf_quantizer is compileable


def test_single_device_dispatch_hooks_are_removed_so_the_decode_compiles_in_one_graph():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from sweep.backends.checkpoint import drop_single_device_hooks

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    # what GPTQModel does when it loads onto one CUDA device: a hook per decoder layer and top module
    for name in ("model.embed_tokens", "model.norm", "lm_head", "model.layers.0", "model.layers.1"):
        add_hook_to_module(model.get_submodule(name), AlignDevicesHook(torch.device("cpu"), io_same_device=True))

    def decode_step_graph_breaks():
        torch._dynamo.reset()
        cache = StaticCache(config=config, max_cache_len=16)
        step = dict(input_ids=torch.tensor([[3]]), past_key_values=cache, cache_position=torch.tensor([0]))
        return torch._dynamo.explain(model)(**step).graph_break_count

    with torch.no_grad():
        before = model(torch.tensor([[1, 2, 3]])).logits
        # With the hooks in place the count depends on accelerate: releases that mark
        # AlignDevicesHook.pre_forward compile-disabled (the one on the H100) break the graph at every
        # hooked module; accelerate 1.16 no longer disables it and traces through. What must hold
        # either way: the hooks go, the outputs stay, and the step is one graph.
        decode_step_graph_breaks()
        assert drop_single_device_hooks(model) == 5
        assert not any(hasattr(m, "_hf_hook") for m in model.modules())
        assert decode_step_graph_breaks() == 0
        assert torch.equal(model(torch.tensor([[1, 2, 3]])).logits, before)
    assert drop_single_device_hooks(model) == 0  # nothing left to remove


# --- fused projections (sweep/backends/tinygemm_fusion.py) ---------------------------------------

def tiny_llama_on_tinygemm(seed=0):
    """A 2-layer Llama whose decoder linears all run on tinygemm (random 4-bit codes, group 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))  # every layer different (gate vs up, k vs v)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, nn.Linear):
                    n, k = linear.weight.shape
                    codes, scales, zeros, _ = random_layer(out_features=n, in_features=k, seed=next(seeds))
                    setattr(parent, name, TinyGemmInt4Linear(codes, scales.half(), zeros, 32))
    return model


def test_concatenated_layer_computes_its_parts_side_by_side():
    parts = []
    for seed, (n, bias) in enumerate([(128, None), (64, torch.randn(64)), (64, None)]):
        codes, scales, zeros, _ = random_layer(out_features=n, in_features=128, seed=seed)
        parts.append(TinyGemmInt4Linear(codes, scales.half(), zeros, 32, bias=bias))
    fused = TinyGemmInt4Linear.concatenate(parts)
    x = torch.randn(3, 128)
    assert fused.out_features == 256
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    codes, scales, zeros, _ = random_layer(out_features=64, in_features=576)
    with pytest.raises(TinyGemmError, match="same input size"):
        TinyGemmInt4Linear.concatenate([parts[0], TinyGemmInt4Linear(codes, scales.half(), zeros, 32)])
    # the CPU layout pairs rows n and n + 32 within blocks of 64: a 32-row layer cannot be joined
    codes, scales, zeros, _ = random_layer(out_features=32, in_features=128)
    with pytest.raises(TinyGemmError, match="64-row blocks"):
        TinyGemmInt4Linear.concatenate([parts[0], TinyGemmInt4Linear(codes, scales.half(), zeros, 32)])


def test_fused_projections_keep_the_logits_and_decode_in_one_graph():
    from transformers import StaticCache

    from sweep.backends.checkpoint import kernel_classes
    from sweep.backends.tinygemm_fusion import FusedGatedMLP, FusedQKVProjection, QKVSlot, fuse_projections

    model = tiny_llama_on_tinygemm()
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_projections(model) == {"qkv": 2, "gate_up": 2}
        after = model(ids).logits
        attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert isinstance(attention.q_proj, FusedQKVProjection) and isinstance(attention.k_proj, QKVSlot)
        assert attention.q_proj.qkv_proj.out_features == 128 + 64 + 64 and isinstance(mlp, FusedGatedMLP)
        assert torch.equal(after, before)
        assert {"FusedGatedMLP", "FusedQKVProjection", "TinyGemmInt4Linear"} <= set(kernel_classes(model))
        # no activation is held between layers once k and v took their slices
        assert attention.k_proj.slices.source is None and attention.k_proj.slices.key is None
        # the compiled decode step sees one graph: the slices are plain attributes, not graph breaks
        torch._dynamo.reset()
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids, past_key_values=cache, cache_position=torch.arange(5))
        step = dict(input_ids=torch.tensor([[3]]), past_key_values=cache, cache_position=torch.tensor([5]))
        assert torch._dynamo.explain(model)(**step).graph_break_count == 0
    assert fuse_projections(model) == {"qkv": 0, "gate_up": 0}  # nothing left to fuse


def test_fusion_only_where_asked_and_a_wrong_fusion_fails_loudly():
    from sweep.backends.tinygemm_fusion import FusedGatedMLP, fuse_projections

    model = tiny_llama_on_tinygemm()
    assert fuse_projections(model, qkv=False) == {"qkv": 0, "gate_up": 2}
    assert isinstance(model.model.layers[1].mlp, FusedGatedMLP)
    assert isinstance(model.model.layers[1].self_attn.k_proj, TinyGemmInt4Linear)

    def swapped(layers):  # a fusion that gets the order of its parts wrong
        return TinyGemmInt4Linear.concatenate(layers[::-1] if len(layers) == 2 else layers)

    model = tiny_llama_on_tinygemm()
    with pytest.raises(TinyGemmError, match="method.fuse_projections=false"):
        fuse_projections(model, concatenate=swapped)


def test_a_key_slot_called_out_of_order_says_why():
    from sweep.backends.tinygemm_fusion import fuse_projections

    model = tiny_llama_on_tinygemm()
    fuse_projections(model)
    with pytest.raises(RuntimeError, match="q_proj did not see"):
        model.model.layers[0].self_attn.k_proj(torch.randn(1, 128))


def test_fuse_projections_is_an_option_of_gptq_and_autoround():
    assert make_config("method=gptq").method["fuse_projections"] is True
    assert make_config("method=autoround", "method.fuse_projections=false").method["fuse_projections"] is False
