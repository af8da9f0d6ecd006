"""What a tensor holds in memory, tensor subclasses included."""
from __future__ import annotations

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds. A wrapper tensor subclass (optimum-quanto's packed weights, whose
    `element_size()` is that of the dtype they dequantize to) is counted by the inner tensors it
    flattens into: its codes, scales and shifts."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.nelement() * tensor.element_size()
