"""Quantizer numerics on synthetic weights and activations (no model needed)."""
from __future__ import annotations

import pytest
import torch

from sweep.quant.grid import fit_grid, qdq_rtn
from sweep.quant.storage import storage_bits_per_weight
from sweep.quant import gptq_columns, gptq_solver
from sweep.quant.gptq_solver import HessianAccumulator, RowBuffer, _upper_cholesky_of_inverse, gptq_quantize


def _weight(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # Columns of very different scale, as in real layers: this is where small groups pay off.
    return w * torch.linspace(0.05, 3.0, cols)[torch.randperm(cols, generator=g)]


def _mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_shrinks_with_every_extra_bit(sym):
    w = _weight()
    errors = [_mse(w, qdq_rtn(w, bits, 32, sym)) for bits in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_smaller_groups_beat_per_channel(bits):
    w = _weight()
    per_channel = _mse(w, qdq_rtn(w, bits, -1, True))
    g128 = _mse(w, qdq_rtn(w, bits, 128, True))
    g32 = _mse(w, qdq_rtn(w, bits, 32, True))
    assert g32 < g128 < per_channel


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_codes_stay_in_range_and_levels_are_few(bits, sym):
    w = _weight(8, 96)
    grid = fit_grid(w, bits, sym)
    q = grid.quantize(w)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    out = qdq_rtn(w, bits, -1, sym)
    for row in out:
        assert len(torch.unique(row)) <= 2**bits


def test_one_bit_symmetric_is_sign_times_scale():
    w = torch.tensor([[0.5, -0.2, 0.1, -1.0]])
    out = qdq_rtn(w, 1, -1, True)
    assert torch.equal(torch.sign(out), torch.sign(w))
    assert torch.allclose(out.abs(), torch.full_like(out, 1.0))


def test_asymmetric_grid_represents_zero_exactly():
    w = _weight(16, 64).abs() + 0.3  # all positive: asym must not waste levels on negatives
    assert _mse(w, qdq_rtn(w, 3, -1, False)) < _mse(w, qdq_rtn(w, 3, -1, True))


def test_ragged_last_group_is_quantized_too():
    w = _weight(8, 100)
    out = qdq_rtn(w, 4, 32, True)  # groups of 32, 32, 32 and 4
    assert _mse(w[:, 96:], out[:, 96:]) < 0.05 * float((w[:, 96:] ** 2).mean())


def test_storage_bits_count_scales_and_zeros():
    assert storage_bits_per_weight(4, 128, 4096, sym=True) == pytest.approx(4 + 16 / 128)
    assert storage_bits_per_weight(4, 128, 4096, sym=False) == pytest.approx(4 + 20 / 128)
    assert storage_bits_per_weight(4, -1, 4096, sym=True) == pytest.approx(4 + 16 / 4096)


def _calibration(cols=256, n=2048, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Strongly correlated inputs with outlier channels: the regime GPTQ is made for.
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :8] *= 10
    return x


def _hessian(x):
    acc = HessianAccumulator(x.shape[1], x.device)
    for chunk in x.split(256):
        acc.add(chunk)
    return acc.H


def test_hessian_accumulator_matches_closed_form():
    x = _calibration(64, 1000)
    assert torch.allclose(_hessian(x), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_hessian_of_a_batch_is_the_hessian_of_its_samples_added_one_by_one_bit_for_bit():
    # A batched calibration pass must accumulate exactly what one sample at a time does.
    batch = _calibration(64, 4 * 50).reshape(4, 50, 64)
    together, one_by_one = HessianAccumulator(64, torch.device("cpu")), HessianAccumulator(64, torch.device("cpu"))
    together.add(batch)
    for sample in batch:
        one_by_one.add(sample.unsqueeze(0))
    assert torch.equal(together.H, one_by_one.H) and together.nsamples == one_by_one.nsamples == 200



def test_hessian_of_bfloat16_inputs_is_the_float32_hessian_of_their_values_however_they_are_batched(monkeypatch):
    # bfloat16 inputs (a CPU model in bfloat16) are gathered into one float32 product per
    # HESSIAN_ROWS_PER_PRODUCT rows: H = 2/n Σ x xᵀ up to the order of the float32 sums, and the same bits
    # whether the rows came one sample at a time or as one batch.
    monkeypatch.setattr(gptq_solver, "HESSIAN_ROWS_PER_PRODUCT", 200)  # two products for 300 rows
    x = _calibration(96, 3 * 100).to(torch.bfloat16)
    one_by_one, batched = HessianAccumulator(96, torch.device("cpu")), HessianAccumulator(96, torch.device("cpu"))
    for sample in x.reshape(6, 50, 96):
        one_by_one.add(sample.unsqueeze(0))
    batched.add(x[:200].reshape(4, 50, 96))
    batched.add(x[200:].reshape(2, 50, 96))
    closed = 2 * x.double().t() @ x.double() / 300
    assert one_by_one.nsamples == batched.nsamples == 300 and batched.H.dtype == torch.float32
    assert torch.equal(one_by_one.H, batched.H) and torch.equal(batched.H, batched.H.t())
    assert torch.allclose(batched.H.double(), closed, rtol=1e-5, atol=1e-5 * float(closed.abs().max()))

def test_bfloat16_rows_gathered_in_a_shared_buffer_give_the_hessian_of_the_rows_concatenated(monkeypatch):
    # Sequential calibration hands one RowBuffer from group to group (sweep/quant/sequential.py): a buffer
    # left larger and dirty by a wider layer's rows, and grown while rows are pending, must give the bits of
    # H summed from the rows concatenated per product (the float32 copies torch.cat joined before).
    monkeypatch.setattr(gptq_solver, "HESSIAN_ROWS_PER_PRODUCT", 128)  # flushes at 150 and 300 rows, growing
    cpu = torch.device("cpu")
    x = _calibration(96, 6 * 50).to(torch.bfloat16).reshape(6, 50, 96)
    shared = RowBuffer()
    wider = HessianAccumulator(160, cpu, shared)
    wider.add(_calibration(160, 400).to(torch.bfloat16).reshape(4, 100, 160))
    assert wider.H.shape == (160, 160)
    reused, fresh = HessianAccumulator(96, cpu, shared), HessianAccumulator(96, cpu)
    for sample in x:
        reused.add(sample.unsqueeze(0))
        fresh.add(sample.unsqueeze(0))
    want = torch.zeros(96, 96)
    for done, rows in ((0, x[:3]), (150, x[3:])):   # the two products, as 2/n-weighted running sums
        total = done + 150
        want *= done / total
        want.add_(gptq_solver._gram(torch.cat([r.float() for r in rows])), alpha=2.0 / total)
    assert torch.equal(reused.H, want) and torch.equal(fresh.H, want)


@pytest.mark.parametrize("bits, sym", [(1, True), (2, False), (3, True), (4, False), (8, True)])
def test_compiled_gptq_column_loop_computes_the_torch_loops_bits(bits, sym):
    """On a CPU, GPTQ's column loop runs compiled (numba), row by row; it must do exactly the float32
    arithmetic of the torch loop that GPUs run, in the same order."""
    kernel = gptq_columns._numba_kernel()
    if kernel is None:
        pytest.skip("numba is not installed: the CPU column loop falls back to torch")
    w, x = _weight(48, 96), _calibration(96, 400)
    Hinv, _ = _upper_cholesky_of_inverse(_hessian(x), 0.01)
    grid = fit_grid(w[:, 5:37], bits, sym)
    runs = []
    for loop in ("torch", "numba"):
        W1, Q1, Err1 = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        if loop == "torch":
            gptq_columns.columns_torch(W1, Q1, Err1, Hinv, grid.scale, grid.zero, 2**bits - 1, 5, 37)
        else:
            gptq_columns.quantize_columns(W1, Q1, Err1, Hinv, grid.scale, grid.zero, 2**bits - 1, 5, 37)
        runs.append((W1[:, 37:], Q1, Err1))
    for torch_result, numba_result in zip(*runs):
        assert torch.equal(torch_result, numba_result)
    assert runs[0][1][:, 5:37].abs().sum() > 0  # it did quantize


@pytest.mark.parametrize("bits, group_size", [(2, 64), (3, 128), (4, -1), (8, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output_error(bits, group_size, act_order):
    w, x = _weight(), _calibration()
    H = _hessian(x)
    q_gptq = gptq_quantize(w, H, bits, group_size, sym=True, damp_percent=0.01, act_order=act_order).weight
    q_rtn = qdq_rtn(w, bits, group_size, sym=True)
    out_err = lambda q: _mse(x @ w.t(), x @ q.t())  # noqa: E731
    assert out_err(q_gptq) < out_err(q_rtn)


def test_gptq_output_lies_on_the_quantization_grid():
    w, x = _weight(16, 128), _calibration(128, 512)
    q = gptq_quantize(w, _hessian(x), 3, 32, sym=False, static_groups=True, act_order=True).weight
    for g in range(0, 128, 32):
        for row in q[:, g:g + 32]:
            assert len(torch.unique(row)) <= 8


def test_gptq_handles_dead_inputs_and_raises_damping_when_needed():
    w = _weight(16, 64)
    x = _calibration(64, 32)  # fewer samples than columns: H is singular
    x[:, 5] = 0
    result = gptq_quantize(w, _hessian(x), 4, 32, damp_percent=1e-9)
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[:, 5] == 0)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_read_bytes_leave_out_an_untied_input_embedding(tied):
    # The bandwidth fraction divides these bytes by the step time: a decode step reads one row of
    # the input embedding, but the whole table when it doubles as the output head.
    from transformers import LlamaConfig, LlamaForCausalLM

    from sweep.measure.memory import MB, decode_read_mb, weight_footprint_mb

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    table_mb = 1000 * 64 * 4 / MB
    expected = weight_footprint_mb(model) - (0 if tied else table_mb)
    assert decode_read_mb(model) == pytest.approx(expected)


def test_triton_int4_packing_puts_input_column_8j_plus_i_in_nibble_i_of_word_j():
    # The GPU GEMV (sweep/backends/triton_int4.py) reads this layout; the packing itself runs anywhere.
    from sweep.backends.triton_int4 import pack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 256), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(6, 2, generator=g), torch.randint(0, 16, (6, 2), generator=g)
    qweight, s, zs = pack(codes, scales, zeros, torch.float32)
    assert qweight.dtype == torch.int32 and qweight.shape == (6, 32)
    unpacked = torch.stack([(qweight >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(6, 256)
    assert torch.equal(unpacked.to(torch.uint8), codes)
    assert torch.allclose(zs, zeros.float() * scales)
