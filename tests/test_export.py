"""Exported backbones: timm loads them without project code, and ``load_backbone`` reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from foundation.errors import CheckpointError, OutputError
from foundation.export import export_backbone, load_backbone
from foundation.models.vit import ViT, build_vit, build_vit_to_load

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN = (0.1, 0.2, 0.3, 0.4)
STD = (0.5, 0.6, 0.7, 0.8)


def backbone_args(**kwargs) -> dict:
    args = dict(
        arch="vit_tiny",
        in_chans=4,
        spatial_dims=2,
        img_size=32,
        patch_size=8,
        reg_tokens=2,
        init_values=1e-5,
        qkv_bias=True,
    )
    args.update(kwargs)
    return args


def make(args: dict, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    model = build_vit(**args).eval()
    with torch.no_grad():  # move LayerScale off its init so a dropped gamma would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ViT, dict, Path]:
    args = backbone_args()
    model = make(args)
    out = export_backbone(
        model, args, tmp_path_factory.mktemp("run") / "export", mean=MEAN, std=STD, extra={"step": 7}
    )
    return model, args, out


def test_export_files_and_config(exported: tuple[ViT, dict, Path]) -> None:
    model, args, out = exported
    assert sorted(p.name for p in out.iterdir()) == [".foundation.json", "config.json", "model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]  # no temporary left
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] in timm.list_models()
    assert config["num_features"] == 192
    pre = config["pretrained_cfg"]
    assert pre["mean"] == pytest.approx(list(MEAN)) and pre["std"] == pytest.approx(list(STD))
    assert pre["input_size"] == [4, 32, 32]
    assert pre["num_classes"] == 0
    margs = config["model_args"]
    assert margs["in_chans"] == 4 and margs["embed_dim"] == 192 and margs["depth"] == 12
    assert margs["patch_size"] == 8 and margs["img_size"] == 32 and margs["reg_tokens"] == 2
    assert margs["num_heads"] == 3 and margs["init_values"] == pytest.approx(1e-5)
    assert config["foundation"]["backbone_args"] == args
    assert config["foundation"]["step"] == 7


def test_timm_loads_export_without_project_code(exported: tuple[ViT, dict, Path]) -> None:
    model, _, out = exported
    timm_model = timm.create_model("local-dir:" + str(out), pretrained=True).eval()
    assert type(timm_model).__name__ == "VisionTransformer"
    assert timm_model.num_reg_tokens == 2
    x = images(2, 4, 32, 32)
    with torch.no_grad():
        ours = model(x)
        theirs = timm_model(x)
    assert theirs.shape == (2, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert timm_model.pretrained_cfg["mean"] == pytest.approx(MEAN)


def test_timm_export_matches_at_other_input_sizes(exported: tuple[ViT, dict, Path]) -> None:
    model, _, out = exported
    timm_model = timm.create_model("local-dir:" + str(out), pretrained=True).eval()
    x = images(1, 4, 48, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_load_backbone_round_trip(exported: tuple[ViT, dict, Path]) -> None:
    model, args, out = exported
    loaded, meta = load_backbone(out)
    assert meta["backbone_args"] == args
    assert meta["mean"] == pytest.approx(list(MEAN)) and meta["std"] == pytest.approx(list(STD))
    assert meta["source"] == str(out)
    loaded.eval()
    x = images(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    # a run folder holding the export resolves to it
    again, _ = load_backbone(out.parent)
    torch.testing.assert_close(again.pos_embed, model.pos_embed)


def _timm_folder(model: ViT, args: dict, out: Path, drop: tuple[str, ...] = (), dtype=None) -> Path:
    """An export rewritten as timm would write it (no ``foundation`` key), less ``drop``, in ``dtype``."""
    export_backbone(model, args, out, mean=MEAN[: args["in_chans"]], std=STD[: args["in_chans"]])
    config = json.loads((out / "config.json").read_text())
    del config["foundation"]
    (out / "config.json").write_text(json.dumps(config))
    state = {
        k: v.detach().to(dtype or v.dtype).contiguous()
        for k, v in model.state_dict().items()
        if k != "mask_token" and k not in drop
    }
    save_file(state, str(out / "model.safetensors"))
    return out


def test_load_backbone_builds_without_a_throwaway_init(
    exported: tuple[ViT, dict, Path], tmp_path: Path
) -> None:
    """Built on the meta device and given empty storage: every tensor is the file's or a defined zero."""
    model, args, out = exported
    loaded, _ = load_backbone(out)
    state = loaded.state_dict()
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        if k != "mask_token":
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert torch.equal(loaded.mask_token, torch.zeros_like(loaded.mask_token))  # an export has none
    assert all(p.requires_grad for p in loaded.parameters())
    # a timm folder without register tokens: they start as zeros (the plain build's), not uninitialised memory
    plain = backbone_args(in_chans=3, reg_tokens=2, init_values=None)
    folder = _timm_folder(make(plain), plain, tmp_path / "no_regs", drop=("reg_token",))
    no_regs, meta = load_backbone(folder)
    assert meta["kind"] == "timm-folder"
    assert torch.equal(no_regs.reg_token, torch.zeros(1, 2, 192))
    assert torch.isfinite(no_regs(images(1, 3, 32, 32))).all()


def test_load_backbone_missing_weight_still_refused(tmp_path: Path) -> None:
    args = backbone_args(in_chans=3, reg_tokens=0, init_values=None)
    model = make(args)
    out = export_backbone(model, args, tmp_path / "export", mean=MEAN[:3], std=STD[:3])
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in ("mask_token", "norm.bias")}
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="norm.bias"):
        load_backbone(out)
    folder = _timm_folder(model, args, tmp_path / "timm", drop=("blocks.1.attn.proj.weight",))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.weight"):
        load_backbone(folder)


def test_load_backbone_half_precision_file_loads_as_float32(tmp_path: Path) -> None:
    args = backbone_args(in_chans=3, reg_tokens=0, init_values=None)
    model = make(args)
    folder = _timm_folder(model, args, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded, _ = load_backbone(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    expected = model.blocks[0].mlp.fc1.weight.detach().to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.blocks[0].mlp.fc1.weight, expected, rtol=0, atol=0)


def test_build_to_load_falls_back_for_state_no_file_holds(monkeypatch) -> None:
    """A module holding a non-persistent buffer is built the plain way: its value comes from its constructor."""
    extend = ViT._extend

    def with_buffer(self, *a, **k) -> None:
        extend(self, *a, **k)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    monkeypatch.setattr(ViT, "_extend", with_buffer)
    model = build_vit_to_load(**backbone_args())
    assert torch.equal(model.scale, torch.full((3,), 2.0))
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def test_load_plain_timm_export(tmp_path: Path) -> None:
    args = backbone_args(in_chans=3, reg_tokens=0, init_values=None)
    model = make(args)
    out = export_backbone(model, args, tmp_path / "export", mean=MEAN[:3], std=STD[:3])
    config = json.loads((out / "config.json").read_text())
    del config["foundation"]  # as written by timm, not by us
    (out / "config.json").write_text(json.dumps(config))
    loaded, meta = load_backbone(out)
    assert meta["backbone_args"]["arch"] == "timm:vit_tiny_patch16_224"  # the architecture config.json names
    assert meta["backbone_args"]["patch_size"] == 8 and meta["kind"] == "timm-folder"
    x = images(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_3d_export_round_trip(tmp_path: Path) -> None:
    args = backbone_args(in_chans=1, spatial_dims=3, img_size=16, reg_tokens=0)
    model = make(args)
    out = export_backbone(model, args, tmp_path / "export", mean=(0.0,), std=(1.0,))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "foundation_vit3d"
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16, 16]
    loaded, _ = load_backbone(out)
    x = images(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_interrupted_export_does_not_break_a_new_one(tmp_path: Path) -> None:
    leftover = tmp_path / ".tmp-999999-export"  # a killed export's temporary folder
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    args = backbone_args()
    model = make(args)
    out = export_backbone(model, args, tmp_path / "export", mean=MEAN, std=STD)
    assert sorted(p.name for p in out.iterdir()) == [".foundation.json", "config.json", "model.safetensors"]
    loaded, _ = load_backbone(out)
    torch.testing.assert_close(loaded.cls_token, model.cls_token)
    assert not leftover.exists()  # pid 999999 is gone: its temporary folder went with the next export


def test_export_replaces_an_older_one_only_when_asked_and_only_ours(tmp_path: Path) -> None:
    args = backbone_args()
    first, second = make(args, seed=0), make(args, seed=1)
    out = export_backbone(first, args, tmp_path / "export", mean=MEAN, std=STD)
    with pytest.raises(OutputError, match="pass --overwrite"):
        export_backbone(second, args, out, mean=MEAN, std=STD)
    export_backbone(second, args, out, mean=MEAN, std=STD, overwrite=True)
    loaded, _ = load_backbone(out)
    torch.testing.assert_close(loaded.cls_token, second.cls_token)
    (out / "notes.txt").write_text("mine")  # a user's file in our folder: no longer ours to replace
    with pytest.raises(OutputError, match="not ours"):
        export_backbone(first, args, out, mean=MEAN, std=STD, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    torch.testing.assert_close(load_backbone(out)[0].cls_token, second.cls_token)


def _cli_export(*argv: str) -> int:
    from foundation.cli import main

    return main(["export", *argv, "--quiet"])


def test_export_command_never_deletes_what_it_did_not_write(tmp_path: Path, monkeypatch, capsys) -> None:
    args = backbone_args()
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    export_backbone(make(args), args, run / "export", mean=MEAN, std=STD)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("precious")
    monkeypatch.chdir(tmp_path)
    for out, why in (
        (run, "is \\(or holds\\) the input"),
        (run / "export", "is \\(or holds\\) the input"),
        (tmp_path / "runs", "is \\(or holds\\) the input"),
        (Path(".."), "is \\(or holds\\) the input"),
        (user, "folder of other files"),
        (Path("."), "is \\(or holds\\) the input"),
    ):
        assert _cli_export(str(run), "--out", str(out), "--overwrite") == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        import re

        assert re.search(why, err), err
    assert (user / "data.csv").read_text() == "precious"
    assert (run / "export" / "model.safetensors").is_file()
    (tmp_path / "file.txt").write_text("x")
    assert _cli_export(str(run), "--out", str(tmp_path / "file.txt")) == 1
    assert "is not a folder" in capsys.readouterr().err and (tmp_path / "file.txt").read_text() == "x"
    assert _cli_export(str(run), "--out", str(tmp_path / "exp")) == 0
    assert _cli_export(str(run), "--out", str(tmp_path / "exp")) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert _cli_export(str(run), "--out", str(tmp_path / "exp"), "--overwrite") == 0


def test_load_backbone_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither an export"):
        load_backbone(empty)


def test_load_backbone_corrupt_weights_file(tmp_path: Path) -> None:
    args = backbone_args()
    out = export_backbone(make(args), args, tmp_path / "export", mean=MEAN, std=STD)
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_backbone(out)


def test_load_backbone_weights_of_another_architecture(tmp_path: Path) -> None:
    args = backbone_args(reg_tokens=0)
    out = export_backbone(make(args), args, tmp_path / "export", mean=MEAN, std=STD)
    small = make(backbone_args(arch="vit_small", reg_tokens=0))
    state = {k: v.contiguous() for k, v in small.state_dict().items() if k != "mask_token"}
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=str(out)):
        load_backbone(out)
