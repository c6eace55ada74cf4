"""A backbone's identity is its weights, not its path: outputs computed with it record this fingerprint, and a
rerun after the backbone at the same path was retrained sees the change and recomputes."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 (hex, 16 digits) over every parameter and buffer: names, dtypes, shapes and bytes."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():  # the tensor's own buffer: no copy of the weights (same digest as hashing a copy)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
