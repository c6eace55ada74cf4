"""``stats --out`` and ``evaluate canopy-height --out`` replace only an earlier JSON file of the same kind of
ours: never a user's file, another scene, a model, or an input (also one inside an input folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rs_testdata import random_bands, write_raster

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE
from foundation.cli import main
from foundation_domains.remote_sensing.json_outputs import MARKER_KEY
from foundation_domains.remote_sensing.stats import STATS_KIND, BandStats


def scene(path: Path, seed: int = 0) -> Path:
    return write_raster(path, random_bands(3, 20, 20, "uint16", seed=seed))


def one_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line[:6] for line in err.splitlines()].count("error:") == 1, err
    return err


def stats(data: Path, out: Path) -> int:
    return main(["stats", str(data), "--out", str(out), "--quiet", "--window", "16"])


@pytest.mark.parametrize("foreign", ["notes.txt", "canopy.pt", "sc/two.tif", "other.json"])
def test_stats_never_replaces_a_file_that_is_not_ours(tmp_path: Path, capsys, foreign: str) -> None:
    data = scene(tmp_path / "in" / "one.tif")
    out = tmp_path / foreign
    if foreign == "sc/two.tif":
        scene(out, seed=2)  # another scene, not an input of this run
    elif foreign == "other.json":
        out.write_text(json.dumps({"mean": [1.0], "note": "a user's own JSON"}))
    else:
        out.write_bytes(b"\x80model weights" * 1000 if foreign.endswith(".pt") else b"my notes\n")
    before = out.read_bytes()
    assert stats(data, out) == EXIT_NOTHING_DONE
    assert "is not a band-statistics file written by foundation; it was left alone" in one_error(capsys)
    assert out.read_bytes() == before
    assert not list(out.parent.glob(".tmp-*"))


def test_stats_refuses_an_input_file_inside_the_input_folder(tmp_path: Path, capsys) -> None:
    one, two = (
        scene(tmp_path / "sc2" / "one.tif", seed=1),
        scene(tmp_path / "sc2" / "sub" / "two.tif", seed=2),
    )
    for target in (one, two):
        before = target.read_bytes()
        assert stats(tmp_path / "sc2", target) == EXIT_NOTHING_DONE
        assert "is (or holds) the input" in one_error(capsys)
        assert target.read_bytes() == before


def test_stats_replaces_its_own_earlier_file_also_one_without_the_marker(tmp_path: Path, capsys) -> None:
    data = scene(tmp_path / "in" / "one.tif")
    out = tmp_path / "stats.json"
    assert stats(data, out) == EXIT_DONE
    written = json.loads(out.read_text())
    assert written[MARKER_KEY] == STATS_KIND and BandStats.load(out).files == 1
    del written[MARKER_KEY]  # a file of ours from before the marker: recognised by its own keys
    out.write_text(json.dumps({**written, "pixels": 1}))
    assert stats(data, out) == EXIT_DONE
    assert json.loads(out.read_text())[MARKER_KEY] == STATS_KIND and BandStats.load(out).pixels == 400
    capsys.readouterr()


@pytest.mark.parametrize("target", ["notes.txt", "images/a.tif", "folder"])
def test_evaluate_never_replaces_a_file_that_is_not_a_metrics_file_of_ours(
    tmp_path: Path, capsys, target: str
) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    scene(images / "a.tif")
    write_raster(labels / "a.tif", random_bands(1, 20, 20, "float32"))
    out = tmp_path / target
    if target == "folder":
        out.mkdir()
    elif target == "notes.txt":
        out.write_text("my notes\n")
    before = None if out.is_dir() else out.read_bytes()
    argv = ["evaluate", "canopy-height", "--checkpoint", str(tmp_path / "model.pt"), "--quiet"]
    argv += ["--images", str(images), "--labels", str(labels), "--out", str(out)]
    assert main(argv) == EXIT_NOTHING_DONE
    expected = {"notes.txt": "is not a canopy-height-metrics file", "folder": "is a folder"}
    assert expected.get(target, "is (or holds) the input") in one_error(capsys)
    assert before is None or out.read_bytes() == before
