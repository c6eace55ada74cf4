"""CLS attention from the last block's qkv equals timm's own (unfused) attention matrix on the same input."""

from __future__ import annotations

import pytest
import torch

from foundation.errors import ConfigError
from foundation.models.vit import build_vit
from foundation.visualize.attention import record_cls_attention


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's unfused path: the softmaxed matrix is the input of ``attn_drop``; its CLS row."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    return seen[-1][:, :, 0]


MODELS = {
    "recipe with registers": lambda: build_vit(
        "vit_tiny", in_chans=3, img_size=32, patch_size=8, reg_tokens=4
    ),
    "timm qk-norm": lambda: build_vit(
        "timm:vit_small_patch16_224",
        in_chans=3,
        img_size=32,
        patch_size=8,
        model_args={"embed_dim": 64, "depth": 2, "num_heads": 4, "qk_norm": True},
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cls_attention_matches_timm_unfused(name: str, single_thread: None) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # norms that are not the identity, so q_norm/k_norm must be applied
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 40, 32)  # not square: dynamic size
    with record_cls_attention(model) as rows, torch.no_grad():
        model.forward_features(x)
    ours = rows[-1]
    expected = _reference(model, x)
    assert ours.shape == expected.shape == (2, model.blocks[-1].attn.num_heads, model.num_prefix_tokens + 20)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:2]))
    assert not model.blocks[-1].attn._forward_pre_hooks  # the hook is gone after the block


def test_no_class_token_is_refused() -> None:
    model = build_vit(
        "timm:vit_small_patch16_224",
        in_chans=3,
        img_size=32,
        patch_size=8,
        model_args={"embed_dim": 32, "depth": 1, "num_heads": 2, "class_token": False, "global_pool": "avg"},
    )
    with pytest.raises(ConfigError, match="no class token"), record_cls_attention(model):
        pass
