"""``foundation heatmap``: a PNG with a colour bar and a QuPath GeoJSON of tile squares per slide, batch rules as
``embed`` (broken feature files skipped and reported, outputs atomic, only our own files replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_svs
from PIL import Image
from slide_bags import planted_cohort

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation_domains.pathology.slide_classification.heatmap import BAR_WIDTH
from foundation_domains.pathology.slide_classification.model import HeadConfig, MILHead
from foundation_domains.pathology.slide_classification.tile_scores import tile_scores

SMALL = [
    "task.options.hidden=16", "task.options.attention_dim=8", "task.options.folds=2", "train.steps=6",
    "train.batch_size=4", "train.eval_every=3", "train.log_every=3",
]  # fmt: skip
SIDE = 128  # level-0 tile side of the slide with real geometry


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small trained run, its feature files (one broken) and one real slide for the first bag."""
    root = tmp_path_factory.mktemp("cohort")
    feats, labels, run = root / "feats", root / "labels.csv", root / "run"
    planted_cohort(feats, labels, per_class=4, tiles=(30, 50), planted=2, signal=6.0)
    argv = ["finetune", "slide-classification", "--features", str(feats), "--labels", str(labels)]
    assert main([*argv, "--out", str(run), "--quiet", *SMALL]) == 0
    with h5py.File(feats / "s0_00.h5", "r+") as f:  # as embed writes it: a 16-wide grid of 128-px tiles
        n = len(f["coords"])
        f["coords"][...] = np.stack([np.arange(n) % 16 * SIDE, np.arange(n) // 16 * SIDE], 1)
        f["coords"].attrs.update({"patch_size_level0": SIDE, "level0_width": 2048, "level0_height": 1536})
    (feats / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    slides = root / "slides"
    slides.mkdir()
    write_svs(slides / "s0_00.svs")
    return {"feats": feats, "run": run, "slides": slides}


def _heatmap(
    cohort: dict[str, Path], out: Path, capsys: pytest.CaptureFixture, *extra: str
) -> tuple[int, dict]:
    capsys.readouterr()
    argv = ["heatmap", "--checkpoint", str(cohort["run"]), "--features", str(cohort["feats"])]
    code = main([*argv, "--slides", str(cohort["slides"]), "--out", str(out), "--quiet", *extra])
    summary = out / "summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else {}


def test_tile_probabilities_decompose_the_slide_logits() -> None:
    torch.manual_seed(0)
    head = MILHead(HeadConfig(in_dim=8, n_classes=3, hidden=16, attention_dim=8, dropout=0.0))
    features = torch.randn(20, 8)
    out = tile_scores(head, features, torch.device("cpu"))
    tile_logits = torch.log(out["tile_probs"])  # log-softmax: logits up to a per-tile constant
    slide = torch.softmax((out["attention"][:, None] * tile_logits).sum(0), 0)
    torch.testing.assert_close(
        slide, out["probs"], atol=1e-5, rtol=1e-5
    )  # softmax(sum a_i l_i) = slide probs
    assert out["tile_probs"].shape == (20, 3) and torch.allclose(out["attention"].sum(), torch.tensor(1.0))


def test_png_and_geojson_per_slide_broken_file_reported(
    cohort: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "maps"
    code, summary = _heatmap(cohort, out, capsys)
    assert code == EXIT_SOME_SKIPPED  # the broken feature file; every other slide drawn
    assert [s["slide"] for s in summary["slides_skipped"]] == ["broken"]
    assert "broken.h5: cannot be read" in summary["slides_skipped"][0]["reason"]
    assert (
        summary["drawn"] == 8 and not (out / "broken.png").exists() and not (out / "broken.geojson").exists()
    )
    drawn = {s["slide"]: s for s in summary["slides_drawn"]}
    assert drawn["s0_00"]["background"] == "slide"  # found under --slides
    assert drawn["s0_01"]["background"].startswith("white")  # no slide known: drawn on white, said why
    assert summary["class_score_from"] == "slide_classifier_per_tile"

    # the GeoJSON parses back to one square per tile, in level-0 pixels, with QuPath's properties
    with h5py.File(cohort["feats"] / "s0_00.h5", "r") as f:
        coords = f["coords"][()]
    collection = json.loads((out / "s0_00.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(coords)
    for feature, (x, y) in zip(collection["features"], coords, strict=True):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = np.array(feature["geometry"]["coordinates"][0])
        square = [[x, y], [x + SIDE, y], [x + SIDE, y + SIDE], [x, y + SIDE], [x, y]]
        np.testing.assert_array_equal(ring, square)
        assert feature["properties"]["objectType"] == "tile"
        assert set(feature["properties"]["measurements"]) == {
            "attention",
            "attention_percentile",
            "prob_c0",
            "prob_c1",
        }
    attention = [f["properties"]["measurements"]["attention"] for f in collection["features"]]
    assert sum(attention) == pytest.approx(1.0, abs=1e-4)

    # the PNG: the map at thumbnail scale (2048 x 1536 -> 1024 x 768) and a colour bar on its right
    with Image.open(out / "s0_00.png") as image:
        assert image.text["foundation"] == "slide-heatmap" and "attention percentile" in image.text["scale"]
        rgb = np.asarray(image.convert("RGB")).astype(int)
    assert rgb.shape == (768, 1024 + BAR_WIDTH, 3)
    bar = rgb[:, 1024 + int(0.22 * BAR_WIDTH)]  # a column through the middle of the bar
    top, bottom = bar[int(0.08 * 768)], bar[int(0.92 * 768)]
    assert top[0] > 100 and top[0] > top[2] + 80  # jet's high end: red
    assert bottom[2] > 100 and bottom[2] > bottom[0] + 80  # its low end: blue
    tile = rgb[SIDE // 4, SIDE // 4]  # first tile painted half over the slide's white glass
    assert not (tile > 235).all()


def test_rerun_overwrite_and_files_not_ours(cohort: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "maps"
    listing = tmp_path / "list.csv"
    listing.write_text("slide_id\ns0_00.svs\ns1_01\nghost\n")
    code, summary = _heatmap(cohort, out, capsys, "--slides-csv", str(listing))
    assert code == EXIT_SOME_SKIPPED and sorted(s["slide"] for s in summary["slides_drawn"]) == [
        "s0_00",
        "s1_01",
    ]
    assert [s["slide"] for s in summary["slides_skipped"]] == ["ghost"]  # the broken file is not listed
    assert "'ghost' of the slide list has no feature file" in summary["slides_skipped"][0]["reason"]

    before = {p.name: p.read_bytes() for p in out.glob("s[01]_*.*")}
    (out / "notes.txt").write_text("mine")
    code, summary = _heatmap(cohort, out, capsys, "--slides-csv", str(listing))
    assert summary["complete_before"] == 2 and summary["drawn"] == 0  # same model, features, score: done
    code, summary = _heatmap(cohort, out, capsys, "--slides-csv", str(listing), "--score", "class")
    assert code == EXIT_NOTHING_DONE and summary["drawn"] == 0  # made otherwise: kept without --overwrite
    reasons = {s["slide"]: s["reason"] for s in summary["slides_skipped"]}
    assert "pass --overwrite" in reasons["s0_00"] and "pass --overwrite" in reasons["s1_01"]
    assert {p.name: p.read_bytes() for p in out.glob("s[01]_*.*")} == before

    Image.new("RGB", (4, 4)).save(out / "s1_01.png")  # the user's picture under a heatmap's name
    mine = (out / "s1_01.png").read_bytes()
    args = ["--slides-csv", str(listing), "--score", "class", "--class", "c1", "--overwrite"]
    code, summary = _heatmap(cohort, out, capsys, *args)
    assert code == EXIT_SOME_SKIPPED and [s["slide"] for s in summary["slides_drawn"]] == ["s0_00"]
    reasons = {s["slide"]: s["reason"] for s in summary["slides_skipped"]}
    assert "s1_01.png exists and is not a heatmap of ours" in reasons["s1_01"]
    assert (out / "s1_01.png").read_bytes() == mine and (out / "notes.txt").read_text() == "mine"
    assert summary["slides_drawn"][0]["class"] == "c1"
    with Image.open(out / "s0_00.png") as image:
        assert image.text["scale"] == "P(c1) per tile"
    tiles = json.loads((out / "s0_00.geojson").read_text())["features"]
    assert {t["properties"]["classification"]["name"] for t in tiles} <= {"c0", "c1"}
    assert not list(out.glob(".tmp-*"))  # nothing half-written left behind

    refused = main(["heatmap", "--checkpoint", str(cohort["run"]), "--features", str(cohort["feats"]),
                    "--out", str(out), "--score", "class", "--class", "c9", "--quiet"])  # fmt: skip
    assert (
        refused == EXIT_NOTHING_DONE and "--class 'c9' is not a class of the model" in capsys.readouterr().err
    )


def test_every_slide_done_is_exit_0(cohort: dict[str, Path], tmp_path: Path, capsys) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("slide\ns1_00\n")
    code, summary = _heatmap(cohort, tmp_path / "maps", capsys, "--slides-csv", str(listing))
    assert code == EXIT_DONE and summary["drawn"] == 1 and summary["exit_status"] == EXIT_DONE


def test_a_slide_list_path_names_the_feature_file_of_its_folder() -> None:
    from foundation_domains.pathology.heatmap_command import _feature_ids

    # embed named a.svs and case1/a.svs "a" and "case1__a": the list's folder decides, not the bare stem
    names = ["case1/a.svs", "/data/slides/case1/a.svs", "a.svs", "case2/b.svs"]
    chosen, missing = _feature_ids(names, ["a", "case1__a", "b"])
    assert chosen == ["case1__a", "a", "b"] and missing == []


def _some_feats(cohort: dict[str, Path], folder: Path, *names: str) -> Path:
    """A feature folder holding copies of some of the cohort's files (and room for bad ones)."""
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((cohort["feats"] / name).read_bytes())
    return folder


def test_bad_feature_files_are_skipped_by_name_and_the_rest_drawn(
    cohort: dict[str, Path], tmp_path: Path, capsys
) -> None:
    feats = _some_feats(cohort, tmp_path / "feats", "s0_00.h5", "s1_00.h5", "broken.h5")
    with h5py.File(feats / "wide.h5", "w") as f:  # another backbone's width: not this model's features
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        f.create_dataset("features", data=np.zeros((3, 32), np.float32))
    with h5py.File(feats / "short.h5", "w") as f:  # 5 tiles placed, 4 feature rows
        f.create_dataset("coords", data=np.arange(10).reshape(5, 2) * 256)
        f.create_dataset("features", data=np.zeros((4, 16), np.float32))
    with h5py.File(feats / "nan.h5", "w") as f:  # a row embed wrote as NaN (an overflow in half precision)
        f.create_dataset("coords", data=np.arange(6).reshape(3, 2) * 256)
        f.create_dataset("features", data=np.array([[0.0] * 16, [np.nan] * 16, [1.0] * 16], np.float32))
    out = tmp_path / "maps"
    code, summary = _heatmap({**cohort, "feats": feats}, out, capsys)
    assert code == EXIT_SOME_SKIPPED and summary["drawn"] == 2
    reasons = {s["slide"]: s["reason"] for s in summary["slides_skipped"]}
    assert set(reasons) == {"broken", "wide", "short", "nan"}
    assert "nan.h5: 1 of its 3 feature rows are not finite" in reasons["nan"]
    assert "wide.h5" in reasons["wide"] and "32-wide" in reasons["wide"]
    assert (
        "short.h5" in reasons["short"] and "5 tiles" in reasons["short"] and "4 feature" in reasons["short"]
    )
    assert not (out / "short.geojson").exists() and not (out / "wide.png").exists()

    # a slide list naming the broken file reports the file's own reason, once
    listing = tmp_path / "list.csv"
    listing.write_text("slide_id\nbroken.svs\ns0_00\n")
    code, summary = _heatmap(
        {**cohort, "feats": feats}, tmp_path / "maps2", capsys, "--slides-csv", str(listing)
    )
    assert code == EXIT_SOME_SKIPPED and [s["slide"] for s in summary["slides_skipped"]] == ["broken"]
    assert "broken.h5: cannot be read" in summary["slides_skipped"][0]["reason"]


def test_a_pair_left_half_written_is_finished_without_overwrite(
    cohort: dict[str, Path], tmp_path: Path, capsys
) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("slide_id\ns1_00\n")
    out = tmp_path / "maps"
    assert _heatmap(cohort, out, capsys, "--slides-csv", str(listing))[0] == EXIT_DONE
    (out / "s1_00.png").unlink()  # interrupted after the GeoJSON was written
    code, summary = _heatmap(cohort, out, capsys, "--slides-csv", str(listing))
    assert code == EXIT_DONE and summary["drawn"] == 1 and (out / "s1_00.png").exists()


def test_tiles_of_a_slide_qupath_crops_are_in_qupaths_pixels(
    cohort: dict[str, Path], tmp_path: Path, capsys
) -> None:
    feats = _some_feats(cohort, tmp_path / "feats", "s0_00.h5", "s1_00.h5")
    with h5py.File(
        feats / "s0_00.h5", "r+"
    ) as f:  # a MIRAX slide: QuPath shows it from its bounds (256, 512)
        f.attrs["qupath_origin"] = np.array([256, 512])
        coords = f["coords"][()]
    code, summary = _heatmap({**cohort, "feats": feats}, tmp_path / "maps", capsys)
    assert code == EXIT_DONE
    drawn = {s["slide"]: s for s in summary["slides_drawn"]}
    assert drawn["s0_00"]["qupath_origin"] == [256, 512] and drawn["s1_00"]["qupath_origin"] == [0, 0]
    features = json.loads((tmp_path / "maps" / "s0_00.geojson").read_text())["features"]
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in features])
    np.testing.assert_array_equal(corners, coords - [256, 512])
