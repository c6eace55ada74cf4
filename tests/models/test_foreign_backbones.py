"""Published backbones in: every source kind gives timm's own features on the same weights.

Each test builds the model with timm itself (random weights, a tiny config of one variant), saves it the way
it is published, loads it through our path and compares CLS/pooled, register and patch tokens with timm's
``forward_features`` / ``forward_head(pre_logits=True)``, at the training size and at another size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from foundation.config import ModelConfig
from foundation.errors import CheckpointError
from foundation.export import export_backbone, load_backbone
from foundation.models.factory import build_backbone
from foundation.models.vit import ViT

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(embed_dim=64, depth=2, num_heads=2)
# name -> (timm architecture, JSON model_args): one tiny config per VisionTransformer variant
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "class_pos": ("test_vit", dict(TINY, img_size=32, patch_size=8, no_embed_class=False)),
    "no_embed_class_regs": (
        "test_vit",
        dict(TINY, img_size=32, patch_size=8, no_embed_class=True, reg_tokens=4),
    ),
    "class_pos_regs": ("test_vit", dict(TINY, img_size=32, patch_size=8, reg_tokens=2)),
    "no_class_token_avg": (
        "test_vit",
        dict(TINY, img_size=32, patch_size=8, class_token=False, global_pool="avg"),
    ),
    "token_fc_norm_avg": ("test_vit", dict(TINY, img_size=32, patch_size=8, global_pool="avg", fc_norm=True)),
    "qk_norm_layerscale": (
        "test_vit",
        dict(TINY, img_size=32, patch_size=8, qk_norm=True, init_values=1e-5, mlp_ratio=2.5),
    ),
    "map_pool_patch16": ("test_vit", dict(TINY, img_size=64, patch_size=16, global_pool="map")),
    "swiglu_packed_dinov2": ("vit_giant_patch14_dinov2", dict(TINY, embed_dim=96, img_size=28)),
    "swiglu_rmsnorm_aimv2": ("aimv2_large_patch14_224", dict(TINY, img_size=28)),
    "dinov2_regs_patch14": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=28)),
}


def timm_model(name: str, args: dict[str, Any], seed: int = 0, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, dynamic_img_size=True, **args)
    with torch.no_grad():  # off timm's init (LayerScale 1e-5, tokens 1e-6) so a dropped part would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(size: tuple[int, int], channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(seed))


def sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    img, patch = model.patch_embed.img_size[0], model.patch_embed.patch_size[0]
    return [(img, img), (img + 2 * patch, img - patch)]


def assert_same_features(ours: ViT, theirs: torch.nn.Module, channels: int = 3) -> None:
    ours.eval()
    c, p = int(theirs.has_class_token), theirs.num_prefix_tokens
    for size in sizes(theirs):
        x = images(size, channels)
        with torch.no_grad():
            f = theirs.forward_features(x)
            pooled = theirs.forward_head(f, pre_logits=True)
            got = ours.forward_dict(x)
        torch.testing.assert_close(got["cls"], pooled, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["registers"], f[:, c:p], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["patch"], f[:, p:], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), f, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin"])
def test_hf_folder_gives_timm_features(tmp_path: Path, variant: str, layout: str, caplog) -> None:
    name, args = VARIANTS[variant]
    theirs = timm_model(name, args, num_classes=5)  # a classifier head: dropped, said once
    save_for_hf(theirs, str(tmp_path), model_args=args, safe_serialization=layout == "model.safetensors")
    assert (tmp_path / layout).is_file() and "model_args" in json.loads(
        (tmp_path / "config.json").read_text()
    )
    with caplog.at_level(logging.WARNING):
        ours, meta = load_backbone(tmp_path)
    assert sum("classifier head dropped" in r.message for r in caplog.records) == 1
    assert meta["kind"] == "timm-folder" and meta["backbone_args"]["arch"] == f"timm:{name}"
    assert meta["mean"] == pytest.approx(list(theirs.pretrained_cfg["mean"]))
    theirs.reset_classifier(0)
    assert_same_features(ours, theirs)


def test_timm_name_with_bare_file(tmp_path: Path) -> None:
    theirs = timm_model("test_vit", {})
    path = tmp_path / "weights.safetensors"
    save_file(theirs.state_dict(), str(path))
    ours, meta = load_backbone(f"timm:test_vit:{path}")
    assert meta["kind"] == "timm-file" and meta["source"] == str(path)
    assert_same_features(ours, theirs)
    bin_path = tmp_path / "weights.bin"
    torch.save(theirs.state_dict(), bin_path)
    assert_same_features(load_backbone(f"timm:test_vit:{bin_path}")[0], theirs)


def to_meta_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm DINOv2 weights in Meta's own layout (what ``dinov2_vits14_reg4_pretrain.pth`` holds)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    if "reg_token" in state:  # Meta: register_tokens, and the CLS position inside pos_embed
        cls_pos = torch.randn(1, 1, state["pos_embed"].shape[-1], generator=gen)
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_pos
    state["mask_token"] = torch.randn(1, state["cls_token"].shape[-1], generator=gen)
    depth = len(model.blocks)  # chunked blocks, as Meta's block_chunks=2 writes them
    return {
        (
            f"blocks.{int(k.split('.')[1]) // (depth // 2)}.{k[len('blocks.') :]}"
            if k.startswith("blocks.")
            else k
        ): v
        for k, v in state.items()
    }


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_meta_dinov2_keys_through_model_pretrained(tmp_path: Path, name: str) -> None:
    """Meta's keys (register_tokens, CLS position in pos_embed, chunked blocks, mask_token), tiny: in a folder
    whose config.json says the architecture, given to ``model.pretrained``."""
    args = dict(depth=2, img_size=56)
    theirs = timm_model(name, args)
    meta_state = to_meta_dinov2(theirs)
    torch.save(meta_state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name, "model_args": args}))
    ours = build_backbone(ModelConfig(pretrained=str(tmp_path)), channels=3, spatial_dims=2)
    assert torch.equal(ours.mask_token, meta_state["mask_token"])  # kept for iBOT
    assert_same_features(ours, theirs)


def test_meta_dinov2_full_size_detected(tmp_path: Path) -> None:
    """A real-size ViT-S/14 Meta file given bare: recognised by its keys, no architecture needed."""
    theirs = timm_model("vit_small_patch14_dinov2", {})
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_meta_dinov2(theirs), path)
    ours, meta = load_backbone(path)
    assert meta["kind"] == "meta-dinov2" and meta["backbone_args"]["img_size"] == 518
    x = images((56, 42))
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval().forward_features(x), theirs.forward_features(x), rtol=0, atol=1e-5
        )


def test_model_pretrained_folder_with_more_channels(tmp_path: Path, caplog) -> None:
    name, args = VARIANTS["class_pos_regs"]
    theirs = timm_model(name, args)
    save_for_hf(theirs, str(tmp_path), model_args=args, safe_serialization=True)
    same = build_backbone(ModelConfig(pretrained=str(tmp_path)), channels=3, spatial_dims=2)
    assert_same_features(same, theirs)
    with caplog.at_level(logging.WARNING):
        five = build_backbone(ModelConfig(pretrained=str(tmp_path)), channels=5, spatial_dims=2)
    assert any(
        "expanded from 3 to 5 input channels (timm's adapt_input_conv" in r.message for r in caplog.records
    )
    assert five.in_chans == 5 and five.no_embed_class is False and five.num_reg_tokens == 2
    torch.testing.assert_close(five.blocks[1].mlp.fc1.weight, theirs.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize("variant", ["class_pos_regs", "no_class_token_avg", "swiglu_packed_dinov2"])
def test_export_of_foreign_backbone_loads_in_timm(tmp_path: Path, variant: str) -> None:
    name, args = VARIANTS[variant]
    theirs = timm_model(name, args)
    save_for_hf(theirs, str(tmp_path / "hf"), model_args=args, safe_serialization=True)
    ours, meta = load_backbone(tmp_path / "hf")
    out = export_backbone(
        ours, meta["backbone_args"], tmp_path / "export", mean=meta["mean"], std=meta["std"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name
    again = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert_same_features(ours, again)
    assert_same_features(load_backbone(out)[0], theirs)


# -- bad input: one CheckpointError naming the file ----------------------------------------------------------
def hf_folder(tmp_path: Path, variant: str = "class_pos") -> Path:
    name, args = VARIANTS[variant]
    save_for_hf(timm_model(name, args), str(tmp_path), model_args=args, safe_serialization=True)
    return tmp_path


def test_folder_without_weights(tmp_path: Path) -> None:
    (hf_folder(tmp_path) / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=rf"{tmp_path}: holds no weights \(model.safetensors or pytorch_model.bin\)"
    ):
        load_backbone(tmp_path)


def test_weights_of_another_shape_named(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["embed_dim"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: .*another architecture.*: file \(64,\) vs model \(32,\)"
    ):
        load_backbone(folder)


def test_unknown_architecture_lists_close_names(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "vit_smal_patch14_dinov2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"config.json.*'vit_smal_patch14_dinov2'.*close names: vit_small_patch14_dinov2",
    ):
        load_backbone(folder)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_is_not_a_state_dict_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(1), "trap": _Payload(marker)}, path)
    marker.unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin: not a plain state dict.*nothing in it was run"
    ):
        load_backbone(f"timm:test_vit:{path}")
    assert not marker.exists()


def test_hub_name_without_file_says_how(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"names no weights file; no network.*huggingface-cli download"):
        load_backbone("timm:vit_small_patch14_dinov2.lvd142m")
    with pytest.raises(CheckpointError, match="does not exist; no network"):
        load_backbone("vit_small_patch14_dinov2")
    with pytest.raises(CheckpointError, match="hub name; no network"):
        load_backbone("hf-hub:timm/vit_small_patch14_dinov2.lvd142m")


def test_bare_file_without_architecture(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(timm_model("test_vit", {}).state_dict(), str(path))
    with pytest.raises(
        CheckpointError,
        match=r"w.safetensors: a bare weights file does not say its architecture; give it as timm:NAME:",
    ):
        load_backbone(path)


# -- every variant pretrains (DINOv2 + iBOT masks, MAE visible tokens) -------------------------------------
@pytest.mark.parametrize(
    "variant", ["class_pos_regs", "no_class_token_avg", "swiglu_packed_dinov2", "map_pool_patch16"]
)
def test_foreign_variant_pretrains_with_dinov2_and_mae(tmp_path: Path, variant: str) -> None:
    from foundation.config import SSLConfig
    from foundation.ssl.dinov2 import DINOv2
    from foundation.ssl.mae import MAE

    name, args = VARIANTS[variant]
    save_for_hf(timm_model(name, args), str(tmp_path), model_args=args, safe_serialization=True)
    img = args["img_size"]
    for method, objective in (("dinov2", DINOv2), ("mae", MAE)):
        backbone = build_backbone(ModelConfig(pretrained=str(tmp_path)), channels=3, spatial_dims=2)
        cfg = SSLConfig(method=method, head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2)  # fmt: skip
        model = objective(backbone, cfg, total_steps=4)
        n = (img // backbone.patch_size) ** 2
        masks = torch.zeros(4, n, dtype=torch.bool)
        masks[:, : n // 2] = True
        x = images((img, img), seed=2).repeat(2, 1, 1, 1)
        batch = {"global_crops": x, "masks": masks} if method == "dinov2" else {"image": x}
        if method == "mae":
            batch["mask_seed"] = torch.arange(4)
        losses = model(batch, 0)
        total = sum(v for k, v in losses.items() if k == "loss" or k.endswith("_loss"))
        assert torch.isfinite(total)
        total.backward()
        assert backbone.blocks[0].attn.qkv.weight.grad is not None
