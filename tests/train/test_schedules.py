"""Schedules (cosine with warmup, warmup-then-constant, lr scaling) and AdamW parameter groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from foundation.config import OptimConfig
from foundation.models.heads import DINOHead
from foundation.models.vit import ViT, build_vit
from foundation.train.optim import apply_schedules, build_param_groups
from foundation.train.schedules import cosine_schedule, scaled_lr, warmup_then_constant

pytestmark = pytest.mark.usefixtures("single_thread")


# -- schedules -------------------------------------------------------------------------------------------


def test_cosine_schedule_warmup_and_endpoints() -> None:
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10, warmup_start=0.0)
    assert isinstance(s, np.ndarray) and s.dtype == np.float64
    assert len(s) == 100
    np.testing.assert_allclose(s[:10], np.arange(10) / 10)  # linear, not reaching start
    assert s[10] == pytest.approx(1.0)  # the first post-warmup value is start
    assert 0.1 < s[-1] < 0.1 + 1e-3  # approaches end
    assert (np.diff(s[10:]) < 0).all()  # decreasing after warmup
    # halfway through the cosine part: the midpoint of start and end
    assert s[10 + 45] == pytest.approx(0.55)


def test_cosine_schedule_edge_cases() -> None:
    no_warmup = cosine_schedule(0.5, 0.0, total_steps=4)
    np.testing.assert_allclose(no_warmup, [0.5 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    assert len(cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=10)) == 5  # warmup clipped
    np.testing.assert_allclose(
        cosine_schedule(1.0, 0.0, 5, warmup_steps=5, warmup_start=0.5),
        np.linspace(0.5, 1.0, 5, endpoint=False),
    )
    rising = cosine_schedule(0.992, 1.0, total_steps=50)  # teacher momentum goes up
    assert rising[0] == pytest.approx(0.992) and (np.diff(rising) > 0).all() and rising[-1] < 1.0


def test_warmup_then_constant() -> None:
    s = warmup_then_constant(0.04, 0.07, total_steps=10, warmup_steps=4)
    np.testing.assert_allclose(s, [0.04, 0.0475, 0.055, 0.0625] + [0.07] * 6)
    assert len(warmup_then_constant(0.04, 0.07, total_steps=3, warmup_steps=10)) == 3
    np.testing.assert_allclose(warmup_then_constant(0.1, 0.2, total_steps=3, warmup_steps=0), [0.2] * 3)


def test_scaled_lr_by_hand() -> None:
    assert scaled_lr(0.004, 256, 1024, "sqrt") == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, 1024, "linear") == pytest.approx(0.001)
    assert scaled_lr(0.004, 256, 1024, "none") == pytest.approx(0.004)
    assert scaled_lr(1.5e-4, 4096, 256, "linear") == pytest.approx(2.4e-3)
    assert scaled_lr(0.001, 64, 1024, "sqrt") == pytest.approx(0.00025)


# -- parameter groups ------------------------------------------------------------------------------------


class Student(nn.Module):
    def __init__(self, backbone: ViT) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.embed_dim, out_dim=16, hidden_dim=8, bottleneck_dim=4)


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", in_chans=3, patch_size=8, img_size=32, reg_tokens=2, init_values=1e-5)
    return Student(backbone)


def groups_by_name(student: Student, cfg: OptimConfig) -> tuple[list[dict], dict[str, dict]]:
    named = list(student.named_parameters())
    groups = build_param_groups(named, student.backbone, "backbone.", cfg)
    owner = {id(p): g for g in groups for p in g["params"]}
    return groups, {n: owner[id(p)] for n, p in named if p.requires_grad}


def test_param_groups_lr_multipliers(student: Student) -> None:
    cfg = OptimConfig(layer_decay=0.75, patch_embed_lr_mult=0.2)
    groups, by_name = groups_by_name(student, cfg)
    depth = len(student.backbone.blocks)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.75 ** (depth + 1) * 0.2)
    assert by_name["backbone.patch_embed.proj.bias"]["lr_mult"] == pytest.approx(0.75 ** (depth + 1) * 0.2)
    assert by_name["backbone.cls_token"]["lr_mult"] == pytest.approx(0.75 ** (depth + 1))
    assert by_name["backbone.pos_embed"]["lr_mult"] == pytest.approx(0.75 ** (depth + 1))
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.75**depth)
    assert by_name[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.75)
    assert by_name["backbone.norm.weight"]["lr_mult"] == pytest.approx(1.0)
    assert by_name["dino_head.mlp.0.weight"]["lr_mult"] == pytest.approx(1.0)
    # every trainable parameter is in exactly one group; frozen ones in none
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in student.parameters() if p.requires_grad)
    frozen = student.dino_head.last_layer.parametrizations.weight.original0
    assert all(p is not frozen for g in groups for p in g["params"])
    assert all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in groups)


def test_param_groups_weight_decay(student: Student) -> None:
    _, by_name = groups_by_name(student, OptimConfig())
    no_decay = [
        "backbone.cls_token",
        "backbone.reg_token",
        "backbone.pos_embed",
        "backbone.mask_token",
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.norm1.bias",
        "backbone.blocks.3.ls1.gamma",
        "backbone.norm.weight",
        "dino_head.mlp.0.bias",
    ]
    for name in no_decay:
        assert by_name[name]["wd_mult"] == 0.0, name
    for name in (
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.11.mlp.fc2.weight",
        "dino_head.mlp.0.weight",
    ):
        assert by_name[name]["wd_mult"] == 1.0, name


def test_param_groups_last_layer_flag(student: Student) -> None:
    _, by_name = groups_by_name(student, OptimConfig())
    flagged = {n for n, g in by_name.items() if g["is_last_layer"]}
    assert flagged == {"dino_head.last_layer.parametrizations.weight.original1"}


def test_apply_schedules_freezes_last_layer(student: Student) -> None:
    cfg = OptimConfig(layer_decay=0.9)
    groups, _ = groups_by_name(student, cfg)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedules(opt, lr=0.1, wd=0.05, freeze_last_layer=True)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 0.1 * g["lr_mult"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_mult"])
    assert any(g["is_last_layer"] for g in opt.param_groups)
    apply_schedules(opt, lr=0.1, wd=0.05, freeze_last_layer=False)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_mult"])
        if g["is_last_layer"]:
            assert g["lr"] == pytest.approx(0.1)
