"""Pathology outputs a user can trust: features keyed on the backbone's weights, a full disk named and stopped at,
``--out`` refused before anything is created, nothing of the user's replaced, the batch exit-status rule."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import tissue_image, write_ome, write_svs
from PIL import Image

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.export import export_backbone, load_backbone
from foundation.models.fingerprint import weights_fingerprint
from foundation.models.vit import build_vit
from foundation_domains.pathology.embed import slide_identity
from foundation_domains.pathology.tissue import is_our_picture

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
NO_SPACE = "cannot write (no space left on device)"


def _export(out: Path, seed: int, **changes) -> Path:
    import torch

    torch.manual_seed(seed)
    args = {**ARGS, **changes}
    return export_backbone(build_vit(**args), args, out, mean=(0.5,) * 3, std=(0.5,) * 3, overwrite=True)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("backbone") / "export", seed=0)


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    root.mkdir()
    write_svs(root / "a.svs")
    write_ome(root / "b.ome.tif")
    return root


def _embed(slides: Path, backbone: Path, out: Path, *extra: str) -> int:
    argv = ["embed", "--domain", "pathology", "--data", str(slides), "--backbone", str(backbone)]
    argv += ["--out", str(out), "--num-workers", "0", "--quiet", "--batch-size", "16", *extra]
    return main([*argv, "data.options.mpp=1.0"])


def _last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _errors(capsys: pytest.CaptureFixture) -> list[str]:
    """The command's error lines (one is expected), and no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][()]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- completeness is keyed on the weights -----------------------------------------------------------------------
def test_backbone_retrained_at_the_same_path_is_re_embedded_with_overwrite(
    slides: Path, tmp_path: Path, capsys
) -> None:
    path = _export(tmp_path / "backbone", seed=0)
    out = tmp_path / "feats"
    assert _embed(slides, path, out) == EXIT_DONE
    old = _features(out / "a.h5")
    capsys.readouterr()

    _export(path, seed=1)  # other weights, same path (what retraining in place does)
    assert _embed(slides, path, out) == EXIT_NOTHING_DONE  # stale, not "complete"; kept without --overwrite
    assert "made with other weights, settings or slide; pass --overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(old, _features(out / "a.h5"))
    assert _embed(slides, path, out, "--overwrite") == EXIT_DONE
    result = _last_json(capsys)
    assert (result["processed"], result["complete_before"]) == (2, 0)  # ours, replaced: not "complete before"
    new = _features(out / "a.h5")
    assert not np.allclose(old, new)
    with h5py.File(out / "a.h5", "r") as f:
        assert f.attrs["backbone_fingerprint"] == weights_fingerprint(load_backbone(path)[0])

    fresh = tmp_path / "fresh"  # the same features a first run with the new backbone gives
    assert _embed(slides, path, fresh) == EXIT_DONE
    np.testing.assert_array_equal(new, _features(fresh / "a.h5"))
    capsys.readouterr()

    moved = tmp_path / "moved"  # same weights elsewhere: the same backbone, nothing redone
    shutil.copytree(path, moved)
    assert _embed(slides, moved, out) == EXIT_DONE
    assert _last_json(capsys)["complete_before"] == 2


def test_another_slide_under_the_same_name_is_not_complete(
    slides: Path, backbone: Path, tmp_path: Path, capsys
) -> None:
    """``--data slides`` then ``--data slides2`` into one ``--out``: a different ``a.svs`` is not "done"."""
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == EXIT_DONE
    other = tmp_path / "slides2"
    other.mkdir()
    write_svs(other / "a.svs", image=tissue_image(seed=1))
    write_svs(other / "c.svs")
    capsys.readouterr()

    assert _embed(other, backbone, out) == EXIT_SOME_SKIPPED
    result = _last_json(capsys)
    assert (result["processed"], result["skipped"], result["complete_before"]) == (1, 1, 0)
    summary = json.loads((out / "summary.json").read_text())
    (skipped,) = summary["skipped"]
    assert Path(skipped["slide"]) == other / "a.svs"
    assert skipped["reason"].endswith("made with other weights, settings or slide; pass --overwrite")
    with h5py.File(out / "a.h5", "r") as f:
        assert f.attrs["slide"] == str((slides / "a.svs").resolve())  # kept: still the first slide's

    assert _embed(other, backbone, out, "--overwrite") == EXIT_DONE
    assert _last_json(capsys)["processed"] == 1  # a.svs replaced; c.svs complete before
    with h5py.File(out / "a.h5", "r") as f:
        assert f.attrs["slide"] == str((other / "a.svs").resolve())
        assert f.attrs["slide_bytes"] == (other / "a.svs").stat().st_size


def test_a_slide_rewritten_in_place_is_not_complete(slides: Path, backbone: Path, tmp_path: Path, capsys):
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == EXIT_DONE
    write_svs(slides / "a.svs", image=tissue_image(seed=1))  # same path, another scan
    capsys.readouterr()
    assert _embed(slides, backbone, out) == EXIT_SOME_SKIPPED  # a.svs: stale, kept without --overwrite
    assert _embed(slides, backbone, out, "--overwrite") == EXIT_DONE
    result = _last_json(capsys)
    assert (result["processed"], result["complete_before"]) == (1, 1)  # a.svs redone, b.ome.tif kept
    with h5py.File(out / "a.h5", "r") as f:
        assert f.attrs["slide_mtime_ns"] == (slides / "a.svs").stat().st_mtime_ns


def test_a_dicom_folder_is_known_by_its_path_total_size_and_latest_mtime(tmp_path: Path) -> None:
    folder = tmp_path / "slide.dicom"
    folder.mkdir()
    for name, size, mtime_ns in (("level0.dcm", 300, 5_000), ("level1.dcm", 100, 9_000)):
        (folder / name).write_bytes(b"x" * size)
        os.utime(folder / name, ns=(mtime_ns, mtime_ns))
    assert slide_identity(folder) == {
        "slide": str(folder.resolve()),
        "slide_bytes": 400,
        "slide_mtime_ns": 9_000,
    }


# -- a full disk --------------------------------------------------------------------------------------------------
def test_full_disk_before_the_first_slide_is_one_error_and_leaves_nothing(
    slides: Path, backbone: Path, small_disk, fill_disk, capsys
) -> None:
    disk = small_disk(512)
    out = disk / "feats"
    out.mkdir()
    fill_disk(disk, leave_bytes=2048)
    assert _embed(slides, backbone, out) == EXIT_NOTHING_DONE
    assert _errors(capsys) == [f"error: {out / 'a.h5'}: {NO_SPACE}"]
    assert list(out.iterdir()) == []  # no feature file, no temporary, no half summary


def test_a_write_that_hits_the_full_disk_leaves_no_temporary(
    slides: Path, backbone: Path, small_disk, monkeypatch, capsys
) -> None:
    """The free-space check passes, the write itself meets ENOSPC (the kernel's, on a real tmpfs)."""
    import foundation_domains.pathology.feature_file as feature_file

    disk = small_disk(8)  # a feature file here is 13 KiB
    monkeypatch.setattr(feature_file, "_check_space", lambda path, size: None)
    out = disk / "feats"
    assert _embed(slides, backbone, out) == EXIT_NOTHING_DONE
    assert _errors(capsys) == [f"error: {out / 'a.h5'}: {NO_SPACE}"]
    assert not list(out.glob("*.h5")) and _hidden(out) == []


def test_disk_full_part_way_stops_the_job_and_lists_what_was_done(
    slides: Path, backbone: Path, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """Where mounting is not allowed too: the second file's write raises ENOSPC after writing half of it."""
    real = Path.write_bytes

    def fills_up(self: Path, data: bytes) -> int:
        if self.name.endswith("b.ome.h5"):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    (slides / "c.svs").write_bytes((slides / "a.svs").read_bytes())
    out = tmp_path / "feats"
    assert _embed(slides, backbone, out) == EXIT_SOME_SKIPPED
    result = _last_json(capsys)
    assert (result["processed"], result["skipped"], result["exit_status"]) == (1, 2, EXIT_SOME_SKIPPED)
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "summary.json"]  # no temporary, no partial file
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(s["slide"]).name: s["reason"] for s in summary["skipped"]}
    assert reasons["b.ome.tif"] == f"{out / 'b.ome.h5'}: {NO_SPACE}"
    assert reasons["c.svs"].startswith("not started: ")  # the disk is full: the job stopped there
    assert f"stopped: {out / 'b.ome.h5'}: {NO_SPACE}" in caplog.text


# -- what is not ours is left alone --------------------------------------------------------------------------------
def test_a_user_file_under_an_output_name_is_not_replaced(
    slides: Path, backbone: Path, tmp_path: Path, capsys
):
    out = tmp_path / "feats"
    out.mkdir()
    (out / "a.h5").write_text("my notes")
    assert _embed(slides, backbone, out) == EXIT_SOME_SKIPPED
    assert (out / "a.h5").read_text() == "my notes"
    assert _last_json(capsys)["processed"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert "is not a feature file of ours" in summary["skipped"][0]["reason"]


def test_a_summary_that_is_not_ours_refuses_the_folder(slides: Path, backbone: Path, tmp_path: Path, capsys):
    out = tmp_path / "feats"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "results"}')
    assert _embed(slides, backbone, out) == EXIT_NOTHING_DONE
    assert "is not a summary of ours" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_temporaries_of_a_killed_run_are_removed(slides: Path, backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (out / f".tmp-{dead.pid}-a.h5").write_bytes(b"\0" * 4096)
    with h5py.File(out / "b.ome.h5.partial", "w") as f:  # an earlier version's unfinished file
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        f.attrs["complete"] = False
    (out / "a.h5.partial").write_text("a user's file that merely has the name")
    (out / ".tmp-1-notes.txt").write_text("not one of our outputs")
    assert _embed(slides, backbone, out) == EXIT_DONE
    assert _hidden(out) == [".tmp-1-notes.txt"]
    assert [p.name for p in out.glob("*.partial")] == ["a.h5.partial"]


# -- refused before anything is created ----------------------------------------------------------------------------
def test_a_3d_backbone_is_refused_by_name(slides: Path, tmp_path: Path, capsys) -> None:
    volume = _export(tmp_path / "ct-backbone", seed=0, in_chans=1, spatial_dims=3, img_size=32)
    out = tmp_path / "feats"
    assert _embed(slides, volume, out) == EXIT_NOTHING_DONE
    (error,) = _errors(capsys)
    assert str(volume) in error
    assert "3D (volume) backbone" in error and "1 input channel(s), slides are RGB (3)" in error
    assert not out.exists()


def test_a_bad_backbone_leaves_no_empty_folder(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "feats"
    assert _embed(slides, tmp_path / "missing", out) == EXIT_NOTHING_DONE
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("case", ["file", "slides folder", "slide"])
def test_out_that_is_a_file_or_the_slides_is_refused(
    slides: Path, backbone: Path, tmp_path: Path, capsys, case: str
) -> None:
    out = {"file": tmp_path / "notes.txt", "slides folder": slides, "slide": slides / "a.svs"}[case]
    if case == "file":
        out.write_text("mine")
    before = sorted(p.name for p in slides.iterdir())
    assert _embed(slides, backbone, out) == EXIT_NOTHING_DONE
    (error,) = _errors(capsys)
    assert {"file": "is not a folder", "slides folder": "is (or holds) the input"}.get(case, "") in error
    assert sorted(p.name for p in slides.iterdir()) == before
    if case == "file":
        assert out.read_text() == "mine"


def test_read_only_out_is_one_clear_error(slides: Path, backbone: Path, small_disk, capsys) -> None:
    disk = small_disk(4096)
    done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {done.stderr.decode().strip()}")
    assert _embed(slides, backbone, disk / "feats") == EXIT_NOTHING_DONE
    assert _errors(capsys) == [f"error: {disk / 'feats'}: cannot write (read-only file system)"]


# -- pathology-qc ---------------------------------------------------------------------------------------------------
def _qc(out: Path, *inputs: Path) -> int:
    return main(
        ["pathology-qc", *map(str, inputs), "--out", str(out), "--mpp", "1", "--tile-size", "64", "--quiet"]
    )


def test_qc_exit_status_follows_the_batch_rule(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "qc"
    assert _qc(out, slides) == EXIT_DONE
    capsys.readouterr()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "corrupt.svs").write_bytes(b"junk" * 100)
    assert _qc(out, slides, broken) == EXIT_SOME_SKIPPED
    report = _last_json(capsys)
    assert report["exit_status"] == EXIT_SOME_SKIPPED and len(report["slides"]) == 2
    assert [Path(f["slide"]).name for f in report["failed"]] == ["corrupt.svs"]
    assert json.loads((out / "summary.json").read_text()) == report
    assert _hidden(out) == []  # every picture and the summary went through a temporary that is gone
    assert _qc(out, broken) == EXIT_NOTHING_DONE
    assert "no QC picture written" in capsys.readouterr().err


def test_qc_on_a_full_disk_is_one_error(slides: Path, small_disk, fill_disk, capsys) -> None:
    disk = small_disk(256)
    out = disk / "qc"
    out.mkdir()
    fill_disk(disk, leave_bytes=1024)
    assert _qc(out, slides) == EXIT_NOTHING_DONE
    assert _errors(capsys) == [f"error: {out / 'a.svs.png'}: {NO_SPACE}"]
    assert list(out.iterdir()) == []


def test_qc_never_replaces_a_png_that_is_not_ours(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "userpics"
    out.mkdir()
    mine = out / "a.svs.png"  # the user's picture under the name a QC picture of a.svs would take
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mine)
    before = mine.read_bytes()
    for _ in range(2):  # our own picture (b) is replaced on the rerun; the user's never
        assert _qc(out, slides) == EXIT_SOME_SKIPPED
        assert mine.read_bytes() == before
        (failed,) = _last_json(capsys)["failed"]
        assert Path(failed["slide"]).name == "a.svs"
        assert failed["error"].startswith(f"{mine} exists and is not a QC picture of ours")
        assert is_our_picture(out / "b.ome.tif.png") and not is_our_picture(mine)
    assert _hidden(out) == []


def test_qc_refuses_out_that_is_a_file_or_the_slides(slides: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert _qc(mine, slides) == EXIT_NOTHING_DONE
    assert "exists and is not a folder" in capsys.readouterr().err and mine.read_text() == "mine"
    assert _qc(slides, slides) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in capsys.readouterr().err
    assert not list(slides.glob("*.png"))


# -- unreadable slides stay skip-and-report ----------------------------------------------------------------------
def test_a_truncated_slide_is_skipped_and_named(slides: Path, backbone: Path, tmp_path: Path, capsys) -> None:
    whole = (slides / "a.svs").read_bytes()
    (slides / "cut.svs").write_bytes(whole[: len(whole) // 3])
    assert _embed(slides, backbone, tmp_path / "feats") == EXIT_SOME_SKIPPED
    summary = json.loads((tmp_path / "feats" / "summary.json").read_text())
    assert [Path(s["slide"]).name for s in summary["skipped"]] == ["cut.svs"]
    assert "cut.svs" in summary["skipped"][0]["reason"]
    capsys.readouterr()
    assert _qc(tmp_path / "qc", slides) == EXIT_SOME_SKIPPED
    assert [Path(f["slide"]).name for f in _last_json(capsys)["failed"]] == ["cut.svs"]
