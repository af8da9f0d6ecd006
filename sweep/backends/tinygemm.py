"""4-bit GPTQ weights on PyTorch's built-in int4 kernel (tinygemm: `aten._weight_int4pack_mm`).

GPTQModel's CUDA kernels either decode slowly at batch 1 (Triton: a GEMM tiled for larger
batches), break the compiled static-cache decode (ExLlamaV2's custom op), or need a long JIT
compile (Marlin). PyTorch ships its own int4 weight-only matmul, an ordinary aten op: it needs
no extension build and compiles into the CUDA-graph decode step like any other op. This module
moves already-packed GPTQ weights onto it, bit for bit (no re-quantization).

The kernel's contract (which is why kernel=tinygemm_int4 has its own limits):
- 4-bit codes, groups of 32, 64, 128 or 256 contiguous input columns, in_features divisible by the
  group size (no ragged last group) and by 32, out_features divisible by 8;
- it dequantizes as w = (q - 8) * scale + offset, with scale and offset in bfloat16. GPTQ's
  w = (q - zero) * scale maps exactly onto it with offset = (8 - zero) * scale;
- bfloat16 activations: inputs are cast to bfloat16 and outputs back to the model's dtype.
Act-order checkpoints (desc_act, a permuted g_idx) have non-contiguous groups and are refused.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

KERNEL = "tinygemm_int4"
GROUP_SIZES = (32, 64, 128, 256)
MIDPOINT = 8  # tinygemm's codes are centred on 2**(4-1)


class TinyGemmError(ValueError):
    pass


def shape_errors(in_features: int, group_size: int, out_features: int | None = None) -> List[str]:
    """What keeps a layer of this shape off the kernel (out_features None: the input side only)."""
    errors = []
    if group_size not in GROUP_SIZES:
        errors.append(f"group_size {group_size} (allowed: {', '.join(map(str, GROUP_SIZES))})")
    elif in_features % group_size:
        errors.append(f"in_features {in_features} not divisible by group_size {group_size}")
    if in_features % 32:
        errors.append(f"in_features {in_features} not divisible by 32")
    if out_features is not None and out_features % 8:
        errors.append(f"out_features {out_features} not divisible by 8")
    return errors


def fits(group_size: int, desc_act: bool, in_features) -> bool:
    """Whether every linear with these in_features can run on the kernel (act-order never can)."""
    return not desc_act and bool(in_features) and not any(shape_errors(n, group_size) for n in in_features)


def group_size_option_errors(group_size: int) -> List[str]:
    """The config error for a group size the kernel has no layout for (checked before any load)."""
    if group_size in GROUP_SIZES:
        return []
    return [f"group_size={group_size!r} is not allowed with method.kernel={KERNEL!r}: "
            f"allowed are {', '.join(map(str, GROUP_SIZES))}"]


def _inner_k_tiles(in_features: int) -> int:
    # The packed layout tiles K in blocks of 16 * innerKTiles; more inner tiles = wider loads.
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class TinyGemmInt4Linear(nn.Module):
    """y = x @ W.T + b with W held as 4-bit codes in tinygemm's packed layout."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        """codes: [out, in] integers 0..15; scales, zeros: [in // group_size, out] (zeros as integer codes)."""
        super().__init__()
        out_features, in_features = codes.shape
        problems = shape_errors(in_features, group_size, out_features)
        if problems:
            raise TinyGemmError(f"{KERNEL} cannot run this layer: {'; '.join(problems)}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        codes = codes.to(torch.int32)
        if codes.is_cuda:
            # The CUDA op takes two codes per byte, the even column in the high nibble.
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(in_features))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), _inner_k_tiles(in_features))
        offsets = (MIDPOINT - zeros.float()) * scales.float()
        scale_and_offset = torch.stack([scales.float(), offsets], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scale_and_offset", scale_and_offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def row_block(self) -> int:
        """Output rows per block of the packed layout on this layer's device."""
        return 8 if self.packed_weight.is_cuda else 64

    def whole_row_blocks(self) -> bool:
        return self.out_features % self.row_block() == 0

    @classmethod
    def concatenate(cls, layers: List["TinyGemmInt4Linear"]) -> "TinyGemmInt4Linear":
        """One layer computing all of `layers` (same input) side by side: out = cat(outs, -1).

        The packed weight holds whole blocks of output rows (8 on CUDA; 64 on CPU, whose layout pairs
        row n with row n + 32), so layers whose out_features are whole blocks join along dim 0
        without repacking; the scales and offsets join along the output dimension."""
        first = layers[0]
        for layer in layers[1:]:
            if (layer.in_features, layer.group_size) != (first.in_features, first.group_size) \
                    or layer.packed_weight.shape[1:] != first.packed_weight.shape[1:]:
                raise TinyGemmError(f"{KERNEL}: only layers with the same input size, group size and packing "
                                    f"can be fused ({first.extra_repr()} vs {layer.extra_repr()})")
        for layer in layers:
            if not layer.whole_row_blocks():
                raise TinyGemmError(f"{KERNEL}: out_features {layer.out_features} is not a whole number of the "
                                    f"packed layout's {layer.row_block()}-row blocks, so this layer cannot be fused")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.group_size = first.in_features, first.group_size
        fused.out_features = sum(layer.out_features for layer in layers)
        fused.register_buffer("packed_weight", torch.cat([layer.packed_weight for layer in layers], dim=0))
        fused.register_buffer("scale_and_offset", torch.cat([layer.scale_and_offset for layer in layers], dim=1))
        bias = None
        if any(layer.bias is not None for layer in layers):
            like = next(layer.bias for layer in layers if layer.bias is not None)
            bias = torch.cat([layer.bias if layer.bias is not None else
                              torch.zeros(layer.out_features, dtype=like.dtype, device=like.device)
                              for layer in layers])
        fused.register_buffer("bias", bias)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed_weight, self.group_size, self.scale_and_offset)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed_weight, self.group_size,
                                                             self.scale_and_offset)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float weights as the kernel sees them (for checks), via an identity input."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed_weight.device)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).float().t()
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                in_features: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's int32 packing (eight 4-bit codes per word: along in_features in qweight [in/8, out],
    along out_features in qzeros [groups, out/8]) -> codes [out, in] and zeros [groups, out]."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF           # [in/8, 8, out]
    codes = codes.reshape(-1, qweight.shape[1])[:in_features].t()
    zeros = (qzeros.unsqueeze(2) >> shifts[None, None, :]) & 0xF           # [groups, out/8, 8]
    zeros = zeros.reshape(qzeros.shape[0], -1)[:, :scales.shape[1]]
    return codes, zeros


def gptq_module_parts(module: nn.Module, kernel: str = KERNEL):
    """(codes [out, in], scales [groups, out], zeros [groups, out], group_size) of a 4-bit GPTQModel
    quant-linear with contiguous groups (v2 zero points in memory), for the kernels that repack them."""
    if getattr(module, "bits", None) != 4:
        raise TinyGemmError(f"{kernel} runs 4-bit weights only, this layer has bits={getattr(module, 'bits', None)}")
    in_features, group_size = module.in_features, module.group_size
    if group_size == -1:
        group_size = in_features if in_features in GROUP_SIZES else -1
    expected = torch.arange(in_features, device=module.g_idx.device) // max(group_size, 1)
    if group_size == -1 or not torch.equal(module.g_idx[:in_features].long(), expected):
        raise TinyGemmError(f"{kernel} needs contiguous groups of 32-256 columns: act-order (desc_act) and "
                            "per-channel (group_size=-1) checkpoints cannot run on it")
    codes, zeros = unpack_gptq(module.qweight, module.qzeros, module.scales, in_features)
    return codes, module.scales, zeros, group_size


def from_gptq_module(module: nn.Module) -> TinyGemmInt4Linear:
    """Build the tinygemm layer from a GPTQModel quant-linear (v2 zero points in memory)."""
    codes, scales, zeros, group_size = gptq_module_parts(module)
    return TinyGemmInt4Linear(codes, scales, zeros, group_size, bias=getattr(module, "bias", None))


def gptq_reference_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] weights as GPTQ defines them, from the same buffers: scale * (code - zero)."""
    codes, zeros = unpack_gptq(module.qweight, module.qzeros, module.scales, module.in_features)
    groups = module.g_idx[:module.in_features].long()
    return (module.scales.float()[groups] * (codes.t().float() - zeros.float()[groups])).t()


def _is_gptq_quant_linear(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("qweight", "qzeros", "scales", "g_idx", "bits")) \
        and isinstance(getattr(module, "qweight"), torch.Tensor)


def convert_model(model: nn.Module, check_with=None, build=from_gptq_module, kernel: str = KERNEL) -> Dict[str, int]:
    """Replace every 4-bit GPTQ quant-linear in `model` by `build(module)` (a TinyGemmInt4Linear), in place.

    `check_with(module) -> [in, out] weight` (GPTQ's layout) is the loading library's own dequantization:
    the first layer's tinygemm weights are compared with it, so a packing-convention mismatch (e.g.
    zero points stored off by one) fails loudly here instead of producing a quietly wrong model.
    """
    targets = [(name, m) for name, m in model.named_modules() if _is_gptq_quant_linear(m)]
    if not targets:
        raise TinyGemmError(f"{kernel}: the model has no GPTQ-packed layers to convert")
    for index, (name, module) in enumerate(targets):
        try:
            fast = build(module)
        except TinyGemmError as err:
            raise TinyGemmError(f"{name}: {err}") from None
        if index == 0:
            _check_first_layer(name, module, fast, check_with, kernel)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)
        del module
    return {"converted": len(targets)}


def weight_mismatch(fast: nn.Module, expected: torch.Tensor) -> str:
    """How far a packed layer's weights ([out, in], as its kernel computes them) are from `expected`:
    "" within tolerance, else "max error E > T". The packed formats keep bfloat16 scales and offsets,
    about 3 significant digits of each group's scale, hence the tolerance."""
    expected = expected.float()
    tolerance = 2e-2 * expected.abs().max().item() + 1e-6
    error = (fast.dequantized_weight().float() - expected).abs().max().item()
    return f"max error {error:.3g} > {tolerance:.3g}" if error > tolerance else ""


def _check_first_layer(name, module, fast: nn.Module, check_with, kernel: str = KERNEL) -> None:
    expected = gptq_reference_weight(module) if check_with is None else check_with(module).float().t()
    mismatch = weight_mismatch(fast, expected)
    if mismatch:
        raise TinyGemmError(f"{kernel}: layer {name} does not reproduce its GPTQ weights ({mismatch}); the "
                            "checkpoint's packing differs from what this converter reads")
