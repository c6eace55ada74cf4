"""DINOHead: shapes, weight-normalised prototypes, frozen magnitude, gradient flow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from foundation.models.heads import DINOHead


def small_head(nlayers: int = 3) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4, nlayers=nlayers)


def test_shapes_and_layers() -> None:
    head = small_head()
    assert head(torch.randn(2, 5, 8)).shape == (2, 5, 16)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    single = small_head(nlayers=1)
    assert len(single.mlp) == 1 and single.mlp[0].in_features == 8 and single.mlp[0].out_features == 4
    assert single(torch.randn(3, 8)).shape == (3, 16)


def test_logits_are_cosines_and_init() -> None:
    head = small_head()
    # unit bottleneck times unit prototypes: every logit is a cosine in [-1, 1]
    assert head(torch.randn(64, 8) * 100).abs().max() <= 1 + 1e-5
    assert all((m.bias == 0).all() for m in head.mlp if isinstance(m, nn.Linear))
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.5)


def test_weight_norm_direction_scale_invariant() -> None:
    head, x = small_head(), torch.randn(4, 8)
    before = head(x)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(3.0)  # rescale the direction v
    torch.testing.assert_close(head(x), before)


def test_magnitude_fixed_to_one_and_not_trainable() -> None:
    head = small_head()
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    last = [n for n, _ in head.named_parameters() if n.startswith("last_layer")]
    assert len(last) == 2  # g and v are found by name, so the trainer can freeze the layer


def test_gradient_flows_and_deepcopy() -> None:
    head = small_head()
    teacher = copy.deepcopy(head)  # EMA teacher is built by deepcopy
    head(torch.randn(4, 8)).pow(2).sum().backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.testing.assert_close(teacher(torch.ones(1, 8)), head(torch.ones(1, 8)))


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, nlayers=0)
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, out_dim=0)
