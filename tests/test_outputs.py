"""The output rules every command relies on: ownership markers, inputs never replaced, verified atomic writes
and "no space left on device" named (on a real full tmpfs where this machine allows mounting one)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from foundation.batch import exit_status
from foundation.errors import OutputError
from foundation.models.fingerprint import weights_fingerprint
from foundation.outputs import (
    MARKER,
    building_dir,
    check_not_input,
    check_output_dir,
    failure_reason,
    read_marker,
    remove_our_output,
    write_verified,
)


def _ours(folder, kind="export", **files):
    with building_dir(folder, kind, overwrite=True) as tmp:
        for name, text in (files or {"a.txt": "1"}).items():
            (tmp / name).write_text(text)
    return folder


def test_exit_status_rule():
    assert (
        exit_status(3, 0) == 0
        and exit_status(2, 1) == 2
        and exit_status(0, 4) == 1
        and exit_status(0, 0) == 1
    )


def test_a_folder_of_user_files_is_never_replaced(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.docx").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="folder of other files"):
            check_output_dir(user, "export", overwrite=overwrite)
        with pytest.raises(OutputError), building_dir(user, "export", overwrite=overwrite) as tmp:
            (tmp / "a.txt").write_text("x")
    assert (user / "thesis.docx").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left behind


def test_our_folder_is_replaced_only_with_overwrite_and_only_our_files(tmp_path):
    out = _ours(tmp_path / "out", **{"a.txt": "old"})
    assert read_marker(out)["files"] == ["a.txt"]
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output_dir(out, "export", overwrite=False)
    with pytest.raises(OutputError, match="a export of ours, not a monai-bundle"):
        check_output_dir(out, "monai-bundle", overwrite=True)
    _ours(out, **{"a.txt": "new", "b.txt": "2"})
    assert (out / "a.txt").read_text() == "new" and read_marker(out)["files"] == ["a.txt", "b.txt"]
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match=r"files that are not ours \(notes.txt\)"):
        check_output_dir(out, "export", overwrite=True)
    remove_our_output(out)  # only the listed files go; the user's file and the folder stay
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path):
    scene = tmp_path / "scenes" / "a.tif"
    scene.parent.mkdir()
    scene.write_bytes(b"x")
    link = tmp_path / "link.tif"
    link.symlink_to(scene)
    hard = tmp_path / "hard.tif"
    os.link(scene, hard)
    for out in (scene, link, hard, scene.parent, tmp_path):
        with pytest.raises(OutputError, match="is \\(or holds\\) the input"):
            check_not_input(out, [scene])
    check_not_input(tmp_path / "maps" / "a.tif", [scene])  # elsewhere: fine


def test_write_verified_keeps_the_old_file_when_verification_fails(tmp_path):
    path = tmp_path / "map.tif"
    path.write_text("old")

    def bad(_):
        raise ValueError("does not read back")

    with pytest.raises(OutputError, match="map.tif: cannot write \\(does not read back\\)"):
        write_verified(path, lambda tmp: tmp.write_text("new"), bad)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        write_verified(path, lambda tmp: tmp.write_text("new"), overwrite=False)
    write_verified(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"


def test_a_hidden_enospc_is_named(tmp_path):
    wrapped = RuntimeError("[enforce fail at inline_container.cc] unexpected pos 1234 vs 5678")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert failure_reason(wrapped, tmp_path / "x") == "no space left on device"
    assert failure_reason(PermissionError(errno.EACCES, "Permission denied"), tmp_path) == "permission denied"


def test_real_full_disk_gives_one_clear_error_and_no_temporary(small_disk, fill_disk):
    disk = small_disk(256)
    state = {"w": torch.randn(200_000)}  # 800 kB: cannot fit
    with pytest.raises(OutputError, match="step.pt: cannot write \\(no space left on device\\)"):
        write_verified(disk / "step.pt", lambda tmp: torch.save(state, tmp))
    assert list(disk.iterdir()) == []
    fill_disk(disk, leave_bytes=1024)
    with (
        pytest.raises(OutputError, match="no space left on device"),
        building_dir(disk / "export", "export", overwrite=False) as tmp,
    ):
        (tmp / "model.bin").write_bytes(b"\0" * 100_000)
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


def test_marker_is_hidden_and_fingerprint_follows_the_weights(tmp_path):
    assert MARKER.startswith(".")
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    assert weights_fingerprint(a) == weights_fingerprint(a.state_dict()) != weights_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)


def test_a_symlinked_output_folder_is_refused_and_user_sub_folders_stay(tmp_path):
    out = _ours(tmp_path / "e1", **{"a.txt": "1"})
    link = tmp_path / "elink"
    link.symlink_to(out)
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output_dir(link, "export", overwrite=True)
    with (
        pytest.raises(OutputError, match="symbolic link"),
        building_dir(link, "export", overwrite=True) as tmp,
    ):
        (tmp / "a.txt").write_text("2")
    assert link.is_symlink() and (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1", "elink"]
    (out / "mynotes").mkdir()  # a user's empty folder inside ours
    with building_dir(tmp_path / "nested", "export", overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_text("w")
    remove_our_output(out)
    assert (out / "mynotes").is_dir()
    remove_our_output(tmp_path / "nested")
    assert not (tmp_path / "nested").exists()
