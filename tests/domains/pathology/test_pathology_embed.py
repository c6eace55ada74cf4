"""``foundation embed --domain pathology``: one HDF5 per slide, resumable, broken slides skipped and reported."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TISSUE, tissue_image, write_levels, write_ome, write_svs

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation.train.distributed import DistInfo
from foundation_domains.pathology.feature_names import output_names

ARGS = dict(
    arch="vit_tiny",
    in_chans=3,
    spatial_dims=2,
    img_size=64,
    patch_size=16,
    reg_tokens=0,
    init_values=None,
    qkv_bias=True,
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_vit(**ARGS)
    out = tmp_path_factory.mktemp("backbone") / "export"
    return export_backbone(model, ARGS, out, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    (root / "case1").mkdir(parents=True)
    write_svs(root / "case1" / "a.svs")
    write_ome(root / "b.ome.tif")
    (root / "notes.txt").write_text("not a slide")
    return root


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "mpp.csv"
    path.write_text("slide,mpp\nnores.tif,0.25\n")
    return path


def _embed(slides: Path, backbone: Path, out: Path, *extra: str) -> int:
    argv = ["embed", "--domain", "pathology", "--data", str(slides), "--backbone", str(backbone)]
    argv += ["--out", str(out), "--num-workers", "0", "--quiet", "--batch-size", "16", *extra]
    return main([*argv, "data.options.mpp=1.0"])


def test_one_hdf5_per_slide_then_resume(
    slides: Path, backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == EXIT_DONE
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["processed"], result["skipped"], result["complete_before"]) == (2, 0, 0)
    assert result["exit_status"] == EXIT_DONE
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.ome.h5", "summary.json"]
    total = 0
    for name in ("a.h5", "b.ome.h5"):
        with h5py.File(out / name, "r") as f:
            coords, feats = f["coords"][:], f["features"][:]
            attrs = dict(f.attrs)
        n = len(coords)
        total += n
        assert n > 0 and coords.shape == (n, 2) and coords.dtype == np.int64
        assert feats.shape == (n, 192) and feats.dtype == np.float32 and np.isfinite(feats).all()
        # slides are at 0.25 um/px, tiles 64 px at 1.0 um/px: 256 level-0 px, all on the tissue rectangle
        extent = attrs["extent"]
        assert extent == 256
        cx, cy = coords[:, 0] + extent // 2, coords[:, 1] + extent // 2
        assert ((TISSUE[0] <= cx) & (cx < TISSUE[2]) & (TISSUE[1] <= cy) & (cy < TISSUE[3])).all()
        assert attrs["complete"] and attrs["n_tiles"] == n
        assert (attrs["tile_size"], attrs["mpp"], attrs["pooling"]) == (64, 1.0, "cls")
        assert attrs["backbone"] == str(backbone.resolve())
        assert Path(attrs["slide"]).name == {"a.h5": "a.svs", "b.ome.h5": "b.ome.tif"}[name]
        assert {"level", "downsample", "slide_mpp"} <= set(attrs)
        assert attrs["slide_mpp"] == pytest.approx(0.25)
    assert result["tiles"] == total
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["written"]) == 2 and summary["skipped"] == []

    # a rerun skips complete outputs; one whose temporary was left by a crash is redone, the temporary removed
    stamp = (out / "a.h5").stat().st_mtime_ns
    (out / "b.ome.h5").rename(out / ".tmp-999999999-b.ome.h5")  # beyond pid_max: a process that is gone
    assert _embed(slides, backbone, out) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["processed"], result["complete_before"]) == (1, 1)
    assert (out / "a.h5").stat().st_mtime_ns == stamp
    assert (out / "b.ome.h5").is_file() and not list(out.glob(".tmp-*"))

    # other settings (pooling): our outputs are stale, kept and their slides skipped without --overwrite
    assert _embed(slides, backbone, out, "--pooling", "cls+mean") == EXIT_NOTHING_DONE
    assert (out / "a.h5").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert _embed(slides, backbone, out, "--pooling", "cls+mean", "--overwrite") == EXIT_DONE
    with h5py.File(out / "a.h5", "r") as f:
        assert f["features"].shape[1] == 384 and f.attrs["pooling"] == "cls+mean"


def test_broken_slide_is_skipped_and_reported(
    slides: Path, backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (slides / "corrupt.svs").write_bytes(b"\x00garbage\xff" * 500)
    blank = np.full((512, 512, 3), 245, np.uint8)
    res = {"resolution": (4e4, 4e4), "resolutionunit": "CENTIMETER"}
    write_levels(slides / "blank.tif", [blank], first=res)
    write_levels(slides / "nores.tif", [tissue_image(1024, 768, box=(256, 256, 768, 512))])
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == EXIT_SOME_SKIPPED
    assert "3 of 5 slides skipped: see " + str(out / "summary.json") in caplog.text
    assert sorted(p.name for p in out.glob("*.h5")) == ["a.h5", "b.ome.h5"]
    assert not list(out.glob("*.partial"))
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(s["slide"]).name: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == ["blank.tif", "corrupt.svs", "nores.tif"]
    assert "no 64 px tile" in reasons["blank.tif"]
    assert "no usable resolution" in reasons["nores.tif"]
    assert "corrupt.svs" in reasons["corrupt.svs"]
    assert len(summary["written"]) == 2
    # the resolution supplied by an option: that slide is embedded too, the others stay skipped
    assert _embed(slides, backbone, out, "data.options.mpp_csv=" + str(_csv(tmp_path))) == EXIT_SOME_SKIPPED
    assert (out / "nores.h5").is_file()


def test_read_error_mid_slide_with_workers(
    slides: Path, backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Worker processes read the tiles; an error part-way through a slide skips it and leaves no partial."""
    import foundation_domains.pathology.embed as embed_mod

    real = embed_mod.read_tile

    def flaky(slide, tiling, index):
        if slide.path.name == "a.svs" and index == 5:
            raise OSError("simulated decoder failure")
        return real(slide, tiling, index)

    monkeypatch.setattr(embed_mod, "read_tile", flaky)  # inherited by forked workers
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out, "--num-workers", "2") == EXIT_SOME_SKIPPED
    assert "1 of 2 slides skipped" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["b.ome.h5", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    reason = summary["skipped"][0]["reason"]
    assert "a.svs: cannot read tile 5: simulated decoder failure" in reason
    assert "Traceback" not in reason  # the worker's traceback is stripped


def test_slides_are_sharded_by_rank(
    slides: Path, backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun slide i goes to rank i % world_size, each rank writing its own summary; rank 0 writes
    the one merged over the ranks (their reports gathered)."""
    import foundation.train.distributed as distributed
    import foundation_domains.pathology.embed as embed_mod

    gathered: list = []
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    monkeypatch.setattr(embed_mod, "init_distributed", lambda device: info)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda part: gathered.append(part) or [part])
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == 0
    # sorted listing: b.ome.tif (rank 0), case1/a.svs (rank 1)
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "summary_rank1.json"]
    summary = json.loads((out / "summary_rank1.json").read_text())
    assert (summary["ranks"], summary["world_size"], summary["counts"]["written"]) == ([1], 2, 1)

    # rank 0 (run after rank 1 here): the gather gives it rank 1's report too
    info0 = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(embed_mod, "init_distributed", lambda device: info0)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda part: [part, gathered[0]])
    assert _embed(slides, backbone, out) == 0
    merged = json.loads((out / "summary.json").read_text())
    assert merged["counts"]["written"] == 2 and merged["world_size"] == 2 and merged["skipped"] == []
    assert merged["ranks"] == [0, 1] and merged["facts"]["tiles"] > 0
    assert sorted(Path(s["slide"]).name for s in merged["written"]) == ["a.svs", "b.ome.tif"]


def test_out_parent_must_exist(slides: Path, backbone: Path, tmp_path: Path, capsys) -> None:
    assert _embed(slides, backbone, tmp_path / "missing" / "feats") == EXIT_NOTHING_DONE
    assert "does not exist" in capsys.readouterr().err


def test_output_names_disambiguate_equal_stems(tmp_path: Path) -> None:
    slides = (tmp_path / "x" / "s.svs", tmp_path / "y" / "s.svs", tmp_path / "t.tif")
    assert output_names(slides, tmp_path) == ["x__s.h5", "y__s.h5", "t.h5"]
    same_stem = (tmp_path / "a.svs", tmp_path / "a.tif")
    assert output_names(same_stem, tmp_path) == ["a.svs.h5", "a.tif.h5"]
    uids = (tmp_path / "1.2.840.99.1", tmp_path / "1.2.840.99.2")  # DICOM WSI folders named by UID
    for folder in uids:
        folder.mkdir()
    assert output_names(uids, tmp_path) == ["1.2.840.99.1.h5", "1.2.840.99.2.h5"]
