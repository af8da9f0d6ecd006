"""gemv_int4: the project's CUDA int4 GEMV layer for batch-1 decode (sweep/backends/cuda_int4.py).

On CPU the layer runs its exact fallback (dequantize + matmul), so the packing, the conversion from
GPTQ checkpoints, fusion and the refusals are checked here; the kernel itself needs a CUDA GPU and
nvcc (its test skips with the reason on CPU; the H200 figures are in docs/benchmarks.md).
"""
import pytest
import torch
from torch import nn

from sweep.backends.cuda_int4 import GemvInt4Error, GemvInt4Linear, from_gptq_module, shape_errors, tile_for
from sweep.backends.tinygemm import TinyGemmError, convert_model
from sweep.config.schema import ConfigError
from sweep.methods import get_method
from sweep.validation.fields import validate
from sweep.validation.model_fit import check_against_model
from conftest import make_config
from test_tinygemm import FakeGPTQLinear, random_layer


def gemv_layer(out_features=48, in_features=1024, group_size=128, seed=0, dtype=torch.bfloat16, bias=None):
    codes, scales, zeros, weight = random_layer(out_features, in_features, group_size, seed)
    return GemvInt4Linear(codes, scales.t(), zeros.t(), group_size, dtype=dtype, bias=bias), weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_computes_the_gptq_weights(dtype):
    layer, weight = gemv_layer(dtype=dtype)
    # scales and z·s held in the activation dtype: ~3 significant digits of each group's scale
    assert (layer.dequantized_weight().float() - weight).abs().max() < 0.02 * weight.abs().max()
    x = torch.randn(3, 1024)
    expected = x @ weight.t()
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (3, 48)
    assert (out - expected).abs().max() < 0.02 * expected.abs().max()
    assert layer(x[:1]).shape == (1, 48) and layer(x.reshape(3, 1, 1024)).shape == (3, 1, 48)


def test_convert_model_puts_gptq_layers_on_the_kernel():
    codes, scales, zeros, weight = random_layer(96, 2048, 64)
    model = nn.Sequential(FakeGPTQLinear(codes, scales, zeros, 64), nn.ReLU())
    x = torch.randn(2, 2048)
    expected = torch.relu(x @ weight.t())
    stats = convert_model(model, check_with=lambda m: weight.t(), build=lambda m: from_gptq_module(m, torch.bfloat16),
                          kernel="gemv_int4")
    assert stats == {"converted": 1} and isinstance(model[0], GemvInt4Linear)
    assert (model(x) - expected).abs().max() < 0.02 * expected.abs().max()
    # a converter that read the codes differently fails on the first layer, naming the kernel
    model = nn.Sequential(FakeGPTQLinear(codes, scales, zeros, 64))
    with pytest.raises(TinyGemmError, match="gemv_int4: layer 0 does not reproduce"):
        convert_model(model, check_with=lambda m: -weight.t(), build=from_gptq_module, kernel="gemv_int4")


def test_concatenated_layer_computes_its_parts_side_by_side():
    parts = [gemv_layer(n, 1024, 128, seed, bias=bias)[0]
             for seed, (n, bias) in enumerate([(64, None), (32, torch.randn(32)), (32, None)])]
    fused = GemvInt4Linear.concatenate(parts)
    x = torch.randn(2, 1024)
    assert fused.out_features == 128 and torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(GemvInt4Error, match="same input size"):
        GemvInt4Linear.concatenate([parts[0], gemv_layer(32, 2048)[0]])


def test_shapes_the_kernel_cannot_run_are_refused():
    assert shape_errors(4096, 128) == [] and shape_errors(14336, 128) == []
    assert "multiple of 1024" in shape_errors(576, 32)[0]            # the embedded model's width
    assert "group_size 48" in shape_errors(1024, 48)[0]
    codes, scales, zeros, _ = random_layer(8, 576, 32)
    with pytest.raises(GemvInt4Error, match="gemv_int4 cannot run this layer: in_features 576"):
        GemvInt4Linear(codes, scales.t(), zeros.t(), 32)
    # every tile is whole warps of threads, at most 512
    for k in (1024, 2048, 4096, 14336, 28672):
        rows, per_thread, per_step = tile_for(k, 4096)
        threads = k // (32 * per_thread)
        assert threads % 32 == 0 and threads <= 512 and rows % per_step == 0


def test_config_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        validate(make_config("method=gptq", "method.kernel=gemv_int4", "group_size=-1", "desc_act=true"))
    message = str(info.value)
    assert "group_size=-1 is not allowed with method.kernel='gemv_int4'" in message and "desc_act=true" in message
    with pytest.raises(ConfigError, match="cannot run bits=3"):
        validate(make_config("method=gptq", "method.kernel=gemv_int4", "bits=3"))
    with pytest.raises(ConfigError, match="group_size=48 is not allowed with method.kernel='gemv_int4'"):
        validate(make_config("method=autoround", "method.kernel=gemv_int4", "method.export_format=auto_gptq",
                             "group_size=48"))


def test_a_model_the_kernel_cannot_run_is_refused_before_loading(embedded_model_dir):
    # the embedded model's widths (576, 1536) are not multiples of 1024: refused from config.json, not after quantizing
    cfg = make_config("model=smollm2-135m-4l", "method=gptq", "method.kernel=gemv_int4", "group_size=64")
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg)
    message = str(info.value)
    assert "method.kernel='gemv_int4' cannot run model" in message and "hidden_size" in message
    assert "576" in message and "1536" in message and "tinygemm_int4" in message
    # AutoRound's GPTQ export takes the same check (its config needs GPTQModel installed to validate)
    assert get_method("autoround").kernel_shape_errors(cfg, {"hidden_size": 576}) != []
    assert get_method("autoround").kernel_shape_errors(cfg, {"hidden_size": 4096}) == []
    check_against_model(make_config("model=smollm2-135m-4l", "method=gptq", "method.kernel=tinygemm_int4",
                                    "group_size=64"))
    # the 8B shape's widths (4096, 14336) run on it
    check_against_model(make_config("model=llama-3.1-8b-shape", "method=gptq", "method.kernel=gemv_int4",
                                    "group_size=128"))


def test_fusion_with_a_one_token_probe_keeps_the_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sweep.backends.cuda_int4 import is_gemv_layer, one_token_probe
    from sweep.backends.tinygemm_fusion import fuse_projections

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    seed = 0
    for parent in (model.model.layers[0].self_attn, model.model.layers[0].mlp):
        for name, linear in list(parent.named_children()):
            if isinstance(linear, nn.Linear):
                seed += 1
                setattr(parent, name, gemv_layer(*linear.weight.shape, 128, seed)[0])
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        before = model(ids).logits
        counts = fuse_projections(model, fusable=is_gemv_layer, concatenate=GemvInt4Linear.concatenate,
                                  probe_ids=one_token_probe(model))
        assert counts == {"qkv": 1, "gate_up": 1}
        assert (model(ids).logits - before).abs().max() <= 1e-3 * before.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA int4 GEMV needs a CUDA GPU and nvcc")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_the_exact_fallback_on_the_gpu(dtype):
    for k, n in [(4096, 4096), (14336, 512), (1024, 96)]:
        layer, _ = gemv_layer(n, k, 128, seed=k, dtype=dtype)
        layer = layer.cuda()
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        expected = x.float() @ layer.dequantized_weight().float().t()
        got = layer(x).float()
        assert (got - expected).abs().max() < 0.01 * expected.abs().max()
        # small batches: the tensor-core kernel (groups of 128), in one call up to 32 rows, two calls for 40
        for batch in (2, 3, 8, 9, 17, 32, 40):
            rows = torch.randn(batch, k, device="cuda", dtype=dtype)
            expected = rows.float() @ layer.dequantized_weight().float().t()
            assert (layer(rows).float() - expected).abs().max() < 0.01 * expected.abs().max(), batch
    # groups of 64 keep one GEMV per row for a small batch
    layer = gemv_layer(96, 1024, 64, seed=1, dtype=dtype)[0].cuda()
    assert not layer.mma
    rows = torch.randn(3, 1024, device="cuda", dtype=dtype)
    expected = rows.float() @ layer.dequantized_weight().float().t()
    assert (layer(rows).float() - expected).abs().max() < 0.01 * expected.abs().max()


def test_small_batches_take_the_tensor_core_kernel_where_groups_allow():
    from sweep.backends.cuda_int4 import mma_shape_errors, mma_tile_for

    assert mma_shape_errors(4096, 128) == [] and mma_shape_errors(14336, 128) == []
    assert mma_shape_errors(1024, 64) and mma_shape_errors(576, 128)
    assert gemv_layer(48, 1024, 128)[0].mma and not gemv_layer(48, 1024, 64)[0].mma
    # the tile covers the batch's rows in 8-row tiles, within the instantiated kernels
    for rows in range(1, 33):
        m_tiles, n_tiles, warps = mma_tile_for(4096, rows)
        assert 8 * n_tiles >= rows and (m_tiles, n_tiles) in {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (2, 4)}


@pytest.mark.parametrize("kernel", ["tinygemm_int4", "gemv_int4"])
def test_lm_head_is_quantized_by_gptq_and_packed_for_the_kernel(kernel):
    """GPTQModel cannot quantize the 8B shape's head; on these kernels the project's GPTQ does it, on
    the model's final hidden states, and packs the codes. The packed head computes GPTQ's weights,
    whose output error on those hidden states is below RTN's (GPTQ minimises exactly that)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sweep.methods import get_method
    from sweep.methods.base import PACKED, QuantReport
    from sweep.backends.tinygemm import TinyGemmInt4Linear
    from sweep.quant.grid import qdq_rtn

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    calibration = [torch.randint(0, 512, (1, 64)) for _ in range(8)]
    hidden = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: hidden.append(args[0].reshape(-1, 1024)))
    with torch.no_grad():
        for ids in calibration:
            model(input_ids=ids)
    handle.remove()
    X = torch.cat(hidden)
    W = model.lm_head.weight.detach().clone()

    cfg = make_config("method=gptq", f"method.kernel={kernel}", "bits=4", "group_size=64", "quantize_lm_head=true")
    report = QuantReport(backend="gptqmodel", weights=PACKED)
    get_method("gptq")(cfg).pack_lm_head(model, calibration, kernel, report)

    head = model.lm_head
    assert isinstance(head, TinyGemmInt4Linear if kernel == "tinygemm_int4" else GemvInt4Linear)
    assert not model.config.tie_word_embeddings and torch.equal(model.model.embed_tokens.weight, embedding)
    assert report.layers["lm_head"]["bits"] == 4 and report.layers["lm_head"]["error"] > 0
    packed_error = ((X @ (head.dequantized_weight().float() - W).t()) ** 2).mean()
    rtn_error = ((X @ (qdq_rtn(W, 4, 64, True) - W).t()) ** 2).mean()
    assert packed_error < rtn_error
    with torch.no_grad():
        assert model(input_ids=calibration[0]).logits.shape == (1, 64, 512)
