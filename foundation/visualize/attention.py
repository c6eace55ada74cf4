"""CLS attention of a ViT's last block, read from its own ``qkv`` during an ordinary forward.

timm's blocks run fused ``scaled_dot_product_attention``, which never materialises the attention matrix. A
forward pre-hook on the last block's ``attn`` sees that block's (normed) input and recomputes the CLS row
from the block's own weights: ``softmax(q_cls . k^T * scale)`` per head, after ``q_norm``/``k_norm`` as timm
applies them. Only this call's model is touched, only for the ``with`` block; nothing in timm is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from foundation.errors import ConfigError


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
        raise ConfigError(
            f"{type(model).__name__}: its last block has no timm-style attention (qkv, num_heads, scale); "
            "CLS attention maps need a timm VisionTransformer"
        )
    return attn


def cls_attention_row(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token's (token 0) attention over all tokens, ``(B, heads, N)``, of timm ``Attention`` ``attn``
    on its input ``x`` ``(B, N, C)``: the same arithmetic as its unfused path."""
    b, n, _ = x.shape
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // (3 * heads))
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1].float() * float(attn.scale)) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)[:, :, 0]


@contextlib.contextmanager
def record_cls_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, every forward of ``model`` appends its last block's CLS attention ``(B, heads, N)`` to the
    yielded list.

    Raises:
        ConfigError: not a timm-style ViT, or one without a class token (no CLS to attend from).
    """
    if not getattr(model, "has_class_token", True) or getattr(model, "cls_token", 1) is None:
        raise ConfigError(f"{type(model).__name__} has no class token: there is no CLS attention to show")
    attn = _last_attention(model)
    rows: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        with torch.no_grad():
            rows.append(cls_attention_row(attn, args[0]).cpu())

    handle = attn.register_forward_pre_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()
