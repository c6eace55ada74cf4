"""``foundation segment`` writes only what it can verify and refuses what it may not touch: a full disk skips the
volume with one clear reason and leaves no temporary file; ``--out`` that is a file, read-only, or an input, and
a bad checkpoint, give one error line and leave nothing behind; exit codes follow ``foundation.batch``."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import nibabel
import numpy as np
import pytest
from med_testdata import lps_affine, write_nifti
from test_segment import make_checkpoint

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main

SHAPE = (40, 40, 24)  # about 20 KiB of compressed random labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("seg-model"))


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        hu = rng.integers(-900, 900, SHAPE).astype(np.int16)
        write_nifti(tmp_path / "ct" / f"{name}.nii.gz", hu, lps_affine())
    return tmp_path / "ct"


def segment(inputs, checkpoint, out, *extra: str) -> int:
    flags = ["--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *extra]
    return main(["segment", *map(str, inputs), *flags])


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".tmp-*")]


def test_full_disk_is_one_clear_error_and_leaves_no_temporary(
    tmp_path, volumes, checkpoint, small_disk, fill_disk, capsys, caplog
):
    """A real ENOSPC (a full tmpfs): the label map is skipped naming its path and "no space left on device", then
    summary.json cannot be written either, which is the command's one error; nothing half-written stays."""
    disk = small_disk(256)
    out = disk / "seg"
    out.mkdir()
    fill_disk(disk)
    assert segment([volumes / "a.nii.gz"], checkpoint, out) == EXIT_NOTHING_DONE
    assert f"{out / 'a_seg.nii.gz'}: cannot write (no space left on device)" in caplog.text
    assert f"{out / 'summary.json'}: cannot write (no space left on device)" in error_line(capsys)
    assert list(out.iterdir()) == [] and temporaries(disk) == []


def test_a_failing_write_keeps_the_old_map_and_removes_the_temporary(
    tmp_path, volumes, checkpoint, monkeypatch
):
    out = tmp_path / "seg"
    assert segment([volumes], checkpoint, out) == EXIT_DONE
    before = (out / "a_seg.nii.gz").read_bytes()
    real_save = nibabel.save

    def save_then_fail(img, filename):
        if Path(filename).name.endswith("a_seg.nii.gz"):
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(img, filename)

    monkeypatch.setattr(nibabel, "save", save_then_fail)
    assert segment([volumes], checkpoint, out, "--overwrite") == EXIT_SOME_SKIPPED
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(s["input"]).name for s in summary["skipped"]] == ["a.nii.gz"]
    assert "a_seg.nii.gz: cannot write (no space left on device)" in summary["skipped"][0]["reason"]
    assert (out / "a_seg.nii.gz").read_bytes() == before and temporaries(out) == []


def test_a_map_that_does_not_read_back_is_not_renamed_into_place(tmp_path, volumes, checkpoint, monkeypatch):
    out = tmp_path / "seg"
    real_save = nibabel.save

    def save_wrong_shape(img, filename):
        real_save(nibabel.Nifti1Image(np.zeros((2, 2, 2), np.uint8), img.affine), filename)

    monkeypatch.setattr(nibabel, "save", save_wrong_shape)
    assert segment([volumes / "a.nii.gz"], checkpoint, out) == EXIT_NOTHING_DONE
    reason = json.loads((out / "summary.json").read_text())["skipped"][0]["reason"]
    assert "does not read back" in reason
    assert not (out / "a_seg.nii.gz").exists() and temporaries(out) == []


def test_a_file_of_that_name_not_written_by_us_is_never_replaced(tmp_path, volumes, checkpoint):
    out = tmp_path / "seg"
    out.mkdir()
    theirs = write_nifti(out / "a_seg.nii.gz", np.ones(SHAPE, np.uint8), lps_affine())
    before = theirs.read_bytes()
    assert segment([volumes], checkpoint, out, "--overwrite") == EXIT_SOME_SKIPPED
    reason = json.loads((out / "summary.json").read_text())["skipped"][0]["reason"]
    assert "is not a label map of foundation segment" in reason
    assert theirs.read_bytes() == before and (out / "b_seg.nii.gz").is_file()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_that_is_a_file_or_an_input_is_refused(tmp_path, volumes, checkpoint, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert segment([volumes], checkpoint, notes) == EXIT_NOTHING_DONE
    assert "exists and is not a folder" in error_line(capsys) and notes.read_text() == "mine"
    src = volumes / "a.nii.gz"
    before = src.read_bytes()
    assert segment([src], checkpoint, src) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in error_line(capsys)
    assert segment([src], checkpoint, volumes) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in error_line(capsys)
    assert src.read_bytes() == before
    assert sorted(p.name for p in volumes.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_read_only_out_is_one_clear_error(tmp_path, volumes, checkpoint, capsys, small_disk):
    disk = small_disk(4096)  # over 1 MiB free: a full disk is not the explanation
    if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount a tmpfs read-only here")
    assert segment([volumes], checkpoint, disk / "seg") == EXIT_NOTHING_DONE
    assert "read-only file system" in error_line(capsys)
    assert segment([volumes], checkpoint, disk) == EXIT_NOTHING_DONE
    assert "read-only file system" in error_line(capsys)


def test_bad_checkpoint_leaves_no_output_folder(tmp_path, volumes, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "seg"
    assert segment([volumes], bad, out) == EXIT_NOTHING_DONE
    assert "model.pt" in error_line(capsys)
    assert segment([volumes], tmp_path / "missing.pt", out) == EXIT_NOTHING_DONE
    assert "missing.pt" in error_line(capsys)
    assert not out.exists()
