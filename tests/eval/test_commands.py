"""`foundation evaluate` and `foundation embed` end to end on a backbone exported by a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from foundation.cli import main
from foundation.config import load_config
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_recipe_text: str) -> Path:
    root = tmp_path_factory.mktemp("run")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text)
    torch.set_num_threads(1)
    cfg = load_config(recipe, [f"data.path={image_folder}", "train.steps=2"])
    pretrain(cfg, root / "run", DistInfo(0, 1, 0, torch.device("cpu")), quiet=True)
    return root / "run"


def _json_line(capsys) -> dict:
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_evaluate_prints_one_json_line(protocol, tiny_run, image_folder, capsys, tmp_path):
    args = ["evaluate", protocol, "--backbone", str(tiny_run), "--data", str(image_folder)]
    args += ["--val-data", str(image_folder), "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    result = _json_line(capsys)
    assert result["protocol"] == protocol and 0.0 <= result["top1"] <= 1.0
    assert result["n_train"] == result["n_val"] == 24
    if protocol == "linear":
        assert "balanced_accuracy" in result
        # train and val are the same folder here: one cached feature file serves both
        assert len(list((tmp_path / "cache").glob("*.h5"))) == 1


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_evaluate_low_shot_averages_seeded_draws(protocol, tiny_run, image_folder, capsys, tmp_path):
    base = ["evaluate", protocol, "--backbone", str(tiny_run), "--data", str(image_folder), "--quiet"]
    base += ["--val-data", str(image_folder), "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--shots", "2", "--draws", "3"]) == 0
    result = _json_line(capsys)
    assert (result["shots"], result["draws"], len(result["top1_draws"])) == (2, 3, 3)
    assert result["top1"] == pytest.approx(sum(result["top1_draws"]) / 3)
    # one draw of every image a class has (8) is the plain probe
    assert main([*base, "--shots", "8", "--draws", "1"]) == 0
    every = _json_line(capsys)
    assert main(base) == 0
    assert every["top1"] == _json_line(capsys)["top1"] and every["smallest_class"] == 8
    assert main([*base, "--shots", "0"]) == 1
    assert "shots=0" in capsys.readouterr().err


def test_evaluate_random_init_uses_same_architecture(tiny_run, image_folder, capsys):
    args = ["evaluate", "knn", "--backbone", str(tiny_run), "--random-init", "--data", str(image_folder)]
    assert main([*args, "--val-data", str(image_folder), "--quiet"]) == 0
    assert _json_line(capsys)["random_init"] is True


def test_random_init_twin_follows_seed_and_leaves_the_callers_rng(tiny_run, image_folder, capsys, tmp_path):
    """``--seed`` picks the random-init twin (it was documented so, yet every seed built seed 0's network): one
    twin per seed in the feature cache, the same seed twice reuses it, and building it does not reseed the caller."""
    from foundation.export import load_backbone, random_like

    _, meta = load_backbone(tiny_run)
    state = torch.random.get_rng_state()
    first, again, other = (random_like(meta, seed).state_dict() for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["cls_token"], other["cls_token"])
    cache = tmp_path / "cache"
    for seed in ("0", "1", "0"):
        args = ["evaluate", "knn", "--backbone", str(tiny_run), "--random-init", "--seed", seed, "--quiet"]
        args += ["--data", str(image_folder), "--val-data", str(image_folder), "--cache-dir", str(cache)]
        assert main(args) == 0
        _json_line(capsys)
    assert len(list(cache.glob("*.h5"))) == 2


def test_random_init_features_are_cached_per_architecture(tiny_run, image_folder, capsys, tmp_path):
    """A random twin is named by its own weights in the feature cache: another architecture never reads the
    first one's features (the key was "random" + data + size for every backbone)."""
    import timm
    from timm.models import save_for_hf

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    save_for_hf(other, str(tmp_path / "other"), safe_serialization=True)
    cache = tmp_path / "cache"
    for backbone in (tiny_run, tmp_path / "other"):
        args = ["evaluate", "knn", "--backbone", str(backbone), "--random-init", "--data", str(image_folder)]
        assert main([*args, "--val-data", str(image_folder), "--quiet", "--cache-dir", str(cache)]) == 0
        _json_line(capsys)
    assert len(list(cache.glob("*.h5"))) == 2


def test_embed_writes_resumable_hdf5(tiny_run, image_folder, tmp_path, capsys):
    out = tmp_path / "feats.h5"
    args = ["embed", "--data", str(image_folder), "--backbone", str(tiny_run), "--out", str(out)]
    args += ["--batch-size", "5", "--num-workers", "0", "--quiet"]
    assert main(args) == 0
    summary = _json_line(capsys)
    with h5py.File(out) as f:
        feats, ids, labels = f["features"][:], f["ids"][:].astype(str), f["labels"][:]
        assert f.attrs["complete"]
    assert feats.shape == (24, 192) and feats.dtype == np.float32
    assert summary["resumed_from"] == 0
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    assert all(Path(p).is_file() for p in ids)

    # A run cut short leaves only the hidden .OUT.partial; the rerun completes just what is missing.
    out.rename(tmp_path / "full.h5")
    partial = out.with_name(f".{out.name}.partial")
    (tmp_path / "full.h5").rename(partial)
    with h5py.File(partial, "a") as f:
        f.attrs["done"] = 10
        f.attrs["complete"] = False
        f["features"][10:] = 0.0
    assert main(args) == 0
    assert _json_line(capsys)["resumed_from"] == 10
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["features"][:], feats, rtol=1e-5, atol=1e-5)
    assert not partial.exists()

    # Complete output: a rerun does nothing.
    assert main(args) == 0
    assert _json_line(capsys)["resumed_from"] == 24


def test_embed_refuses_a_foreign_output(tiny_run, image_folder, tmp_path, capsys):
    out = tmp_path / "feats.h5"
    with h5py.File(out, "w") as f:
        f.attrs["complete"] = True
    args = ["embed", "--data", str(image_folder), "--backbone", str(tiny_run), "--out", str(out), "--quiet"]
    assert main(args) == 1
    assert "not a feature file of ours; nothing was changed" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 1  # never ours to replace
    with h5py.File(out, "r") as f:
        assert "features" not in f


def test_info_lists_domains_and_versions(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "images" in info["domains"] and info["packages"]["torch"]
    assert set(info["ssl_methods"]) == {"dinov2", "mae"}


def test_export_command_round_trip(tiny_run, tmp_path, capsys):
    import timm

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "exp")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    ours = timm.create_model(f"local-dir:{tiny_run / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ours(x))


def test_help_documents_every_command(capsys):
    for command in ["pretrain", "export", "evaluate", "embed", "info"]:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: foundation" in capsys.readouterr().out


def test_embed_knows_a_retrained_backbone_at_the_same_path(tiny_run, image_folder, tmp_path, capsys):
    from foundation.export import export_backbone, load_backbone

    backbone_dir = tmp_path / "backbone"
    first, meta = load_backbone(tiny_run)
    export_backbone(first, meta["backbone_args"], backbone_dir, mean=meta["mean"], std=meta["std"])
    out = tmp_path / "feats.h5"
    args = ["embed", "--data", str(image_folder), "--backbone", str(backbone_dir), "--out", str(out)]
    args += ["--num-workers", "0", "--quiet"]
    assert main(args) == 0
    with h5py.File(out, "r") as f:
        old = f["features"][()]
    retrained = load_backbone(tiny_run)[0]
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(0.05)
    export_backbone(
        retrained, meta["backbone_args"], backbone_dir, mean=meta["mean"], std=meta["std"], overwrite=True
    )
    assert main(args) == 1  # not "already complete": the weights changed
    assert "holds other features" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    with h5py.File(out, "r") as f:
        new = f["features"][()]
        assert f.attrs["backbone_weights"] != "" and not (tmp_path / "feats.h5.partial").exists()
    assert not torch.allclose(torch.from_numpy(new), torch.from_numpy(old))


def test_embed_skips_and_names_a_broken_image_and_never_touches_a_users_partial(
    tiny_run, image_folder, tmp_path, capsys
):
    import shutil
    import subprocess
    import sys

    data = tmp_path / "imgs"
    shutil.copytree(image_folder, data)
    broken = sorted((data).rglob("*.png"))[3]
    broken.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "f.h5"
    (tmp_path / "f.h5.partial").write_text("the user's own file")
    args = ["embed", "--data", str(data), "--backbone", str(tiny_run), "--out", str(out), "--quiet"]
    assert main([*args, "--num-workers", "2", "--batch-size", "5"]) == 2
    result = _json_line(capsys)
    assert [s["id"] for s in result["skipped"]] == [str(broken)] and result["n"] == 23
    with h5py.File(out, "r") as f:
        assert f["features"].shape[0] == 23 and str(broken) not in list(f["ids"].asstr()[()])
    assert (tmp_path / "f.h5.partial").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "f.h5.partial", "imgs"]
    hold = (
        "import sys, time; from foundation.train.lock import ProcessLock\n"
        "ProcessLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    other = tmp_path / "g.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / ".g.h5.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*args[:-3], "--out", str(other), "--quiet"]) == 1
        assert f"--out {other} is in use: pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
