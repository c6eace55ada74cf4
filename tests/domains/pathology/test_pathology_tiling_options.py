"""Tiling controls users ask for: a fixed tissue threshold, tile overlap, a slide list (CLAM's process_list) and
GeoJSON regions (QuPath annotations) that restrict tiling, in pretraining, ``embed`` and ``pathology-qc``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import HEIGHT, WIDTH, tissue_image, write_svs

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.config import load_config
from foundation.errors import ConfigError, DataError
from foundation_domains.pathology.regions import read_region, region_for
from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.slide_list import choose_slides, read_slides_csv
from foundation_domains.pathology.source import PathologyOptions
from foundation_domains.pathology.tissue import TileRules, detect_tissue, tile_slide

# the left half of the tissue rectangle, as QuPath exports an annotation (level-0 pixels, closed ring)
LEFT = [[512, 512], [1024, 512], [1024, 1024], [512, 1024], [512, 512]]


def _geojson(path: Path, polygons: list, *, wrap: str = "collection") -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            },
        }
        for rings in polygons
    ]
    data = {"type": "FeatureCollection", "features": features} if wrap == "collection" else features
    path.write_text(json.dumps(data))
    return path


def test_a_fixed_threshold_replaces_otsu() -> None:
    small = cv2.resize(tissue_image(), (WIDTH // 16, HEIGHT // 16), interpolation=cv2.INTER_AREA)
    assert detect_tissue(small).any()
    assert not detect_tissue(small, threshold=250).any()  # nothing is that saturated
    everything = detect_tissue(np.full((64, 64, 3), 240, np.uint8), threshold=-1)  # every pixel above -1
    assert everything.all()


def test_options_are_checked_by_name() -> None:
    def options(*overrides: str) -> PathologyOptions:
        return load_config(None, list(overrides), domain="pathology").data.typed_options

    o = options(
        "data.options.tissue_threshold=20", "data.options.overlap=16", "data.options.otsu_clip=[4,40]"
    )
    assert o.rules == TileRules(0.25, 20.0, (4, 40), 16)
    assert options().rules == TileRules()  # today's defaults: clipped Otsu, no overlap
    for bad, key in [
        ("data.options.tissue_threshold=median", "tissue_threshold"),
        ("data.options.tissue_threshold=300", "tissue_threshold"),
        ("data.options.overlap=224", "overlap"),
        ("data.options.overlap=-1", "overlap"),
        ("data.options.otsu_clip=[30,8]", "otsu_clip"),
        ("data.options.otsu_clip=5", "otsu_clip"),
        ("data.options.slides_csv=007", "slides_csv"),  # YAML's 7: a path must be a string
        ("data.options.regions=[a]", "regions"),
    ]:
        with pytest.raises(ConfigError, match=f"data.options.{key}="):
            options(bad)


def test_overlap_shortens_the_grid_step(svs: Path) -> None:
    with open_slide(svs) as slide:  # 0.25 um/px: 64 px at 1 um/px = 256 level-0 px
        _, plain = tile_slide(slide, 1.0, 64, TileRules())
        _, overlapping = tile_slide(slide, 1.0, 64, TileRules(overlap=16))
    assert plain.overlap == 0 and overlapping.overlap == 16
    assert (plain.coords % 256 == 0).all()
    assert (overlapping.coords % 192 == 0).all() and overlapping.extent == 256  # step (64 - 16) * 4
    assert len(overlapping) > len(plain)


def test_region_files_as_qupath_writes_them(tmp_path: Path) -> None:
    hole = [[700, 700], [800, 700], [800, 800], [700, 800], [700, 700]]
    region = read_region(_geojson(tmp_path / "a.geojson", [[LEFT, hole]]))
    inside = region.contains(np.array([[600, 600], [750, 750], [1100, 600], [900, 900]]))
    assert inside.tolist() == [True, False, False, True]  # the hole is not in the region
    # a plain list of features (QuPath's export without FEATURE_COLLECTION), and a MultiPolygon
    listed = read_region(_geojson(tmp_path / "b.geojson", [[LEFT]], wrap="list"))
    assert listed.contains(np.array([[600, 600]])).tolist() == [True]
    multi = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [[LEFT]]},
        "properties": {},
    }
    (tmp_path / "c.geojson").write_text(json.dumps(multi))
    assert read_region(tmp_path / "c.geojson").contains(np.array([[600, 600]])).tolist() == [True]

    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(DataError, match="broken.geojson: not usable GeoJSON"):
        read_region(tmp_path / "broken.geojson")
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(DataError, match="points.geojson: holds no Polygon"):
        read_region(tmp_path / "points.geojson")
    bad_ring = {"type": "Polygon", "coordinates": [[[0, 0], [1, "x"]]]}
    (tmp_path / "ring.geojson").write_text(json.dumps(bad_ring))
    with pytest.raises(DataError, match="ring.geojson: .*ring"):
        read_region(tmp_path / "ring.geojson")
    with pytest.raises(DataError, match="no region file in"):
        region_for(tmp_path / "other.svs", tmp_path)
    assert region_for(tmp_path / "a.svs", None) is None
    assert region_for(tmp_path / "b.ome.tif", tmp_path).sha256 == listed.sha256  # b.ome.tif -> b.geojson


def test_a_region_keeps_the_tiles_whose_centre_is_inside(svs: Path, tmp_path: Path) -> None:
    region = read_region(_geojson(tmp_path / "aperio.geojson", [[LEFT]]))
    with open_slide(svs) as slide:
        _, all_tiles = tile_slide(slide, 1.0, 64, TileRules())
        _, kept = tile_slide(slide, 1.0, 64, TileRules(), region)
    centres = kept.coords + 128
    assert 0 < len(kept) < len(all_tiles)
    assert ((centres >= 512) & (centres <= 1024)).all()
    assert region.contains(all_tiles.coords + 128).sum() == len(kept)


def test_slide_list_like_clams_process_list(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    slides = [root / "a.svs", root / "x" / "s.svs", root / "y" / "s.svs", root / "b.ome.tif"]
    for s in slides:
        s.write_bytes(b"")
    csv_path = tmp_path / "process_list.csv"
    csv_path.write_text("slide_id,process\na.svs,1\nskipped.svs,0\nx/s.svs,1\nb.ome,1\nghost.svs,1\ns,1\n")
    names = read_slides_csv(csv_path)
    assert names == ["a.svs", "x/s.svs", "b.ome", "ghost.svs", "s"]  # process 0 left out
    choice = choose_slides(names, slides, root)
    assert choice.chosen == (root / "a.svs", root / "x" / "s.svs", root / "b.ome.tif")
    reasons = {m["slide"]: m["reason"] for m in choice.missing}
    assert set(reasons) == {"ghost.svs", "s"}
    assert "is not a slide found" in reasons["ghost.svs"] and "names several slides" in reasons["s"]
    (tmp_path / "wrong.csv").write_text("name\na.svs\n")
    with pytest.raises(DataError, match="wrong.csv: a slide list needs a column slide_id or slide or path"):
        read_slides_csv(tmp_path / "wrong.csv")


@pytest.fixture
def two_slides(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    root.mkdir()
    write_svs(root / "a.svs")
    write_svs(root / "b.svs")
    return root


def _qc(slides: Path, out: Path, *extra: str) -> int:
    args = ["pathology-qc", str(slides), "--out", str(out), "--mpp", "1", "--tile-size", "64", "--quiet"]
    return main([*args, *extra])


def test_qc_with_a_slide_list_regions_and_overlap(two_slides: Path, tmp_path: Path, capsys) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    _geojson(regions / "a.geojson", [[LEFT]])
    (regions / "b.geojson").write_text("not json")
    listing = tmp_path / "list.csv"
    listing.write_text("slide\na.svs\nb.svs\nghost.svs\n")
    out = tmp_path / "qc"
    code = _qc(two_slides, out, "--regions", str(regions), "--slides-csv", str(listing), "--overlap", "16")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == EXIT_SOME_SKIPPED and [Path(s["slide"]).name for s in report["slides"]] == ["a.svs"]
    errors = {Path(f["slide"]).name: f["error"] for f in report["failed"]}
    assert "b.geojson: not usable GeoJSON" in errors["b.svs"]
    assert "'ghost.svs' of the slide list is not a slide found" in errors["ghost.svs"]
    assert sorted(p.name for p in out.iterdir()) == ["a.svs.png", "summary.json"]  # nothing for b
    with open_slide(two_slides / "a.svs") as slide:
        _, expected = tile_slide(slide, 1.0, 64, TileRules(overlap=16), read_region(regions / "a.geojson"))
    assert report["slides"][0]["tiles"] == len(expected)

    assert _qc(two_slides, tmp_path / "qc2", "--overlap", "64") == EXIT_NOTHING_DONE
    assert "--overlap=64 is out of range" in capsys.readouterr().err


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from foundation.export import export_backbone
    from foundation.models.vit import build_vit

    args = dict(arch="vit_tiny", in_chans=3, spatial_dims=2, img_size=64, patch_size=16, reg_tokens=0)
    args.update(init_values=None, qkv_bias=True)
    out = tmp_path_factory.mktemp("backbone") / "export"
    return export_backbone(build_vit(**args), args, out, mean=(0.5,) * 3, std=(0.5,) * 3)


def _embed(slides: Path, backbone: Path, out: Path, capsys, *options: str) -> tuple[int, dict]:
    capsys.readouterr()
    argv = ["embed", "--domain", "pathology", "--data", str(slides), "--backbone", str(backbone)]
    argv += ["--out", str(out), "--num-workers", "0", "--quiet", "--batch-size", "32"]
    code = main([*argv, "data.options.mpp=1.0", *options])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}  # nothing done: no result printed


def test_embed_with_overlap_regions_and_a_slide_list(
    two_slides: Path, backbone: Path, tmp_path: Path, capsys
) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    _geojson(regions / "a.geojson", [[LEFT]])
    listing = tmp_path / "list.csv"
    listing.write_text("slide_id\na\nghost\n")
    out = tmp_path / "feats"
    options = [
        f"data.options.regions={regions}",
        f"data.options.slides_csv={listing}",
        "data.options.overlap=16",
    ]
    code, result = _embed(two_slides, backbone, out, capsys, *options)
    assert code == EXIT_SOME_SKIPPED and (result["processed"], result["skipped"]) == (1, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert "'ghost' of the slide list is not a slide found" in summary["skipped"][0]["reason"]
    assert sorted(p.name for p in out.glob("*.h5")) == ["a.h5"]  # b is not listed
    with h5py.File(out / "a.h5", "r") as f:
        coords, attrs = f["coords"][()], dict(f["coords"].attrs)
        assert (
            f.attrs["overlap"] == 16 and f.attrs["region_sha256"] == read_region(regions / "a.geojson").sha256
        )
        assert f.attrs["qupath_origin"].tolist() == [0, 0]  # an SVS: QuPath shows it uncropped
    assert attrs["overlap"] == 16 and attrs["patch_size_level0"] == 256  # CLAM/TRIDENT read the real overlap
    centres = coords + 128
    assert ((centres >= 512) & (centres <= 1024)).all() and (coords % 192 == 0).all()

    # a rerun with the same settings finds it complete; another region file is other tiles: not complete
    code, result = _embed(two_slides, backbone, out, capsys, *options)
    assert (result["complete_before"], result["processed"]) == (1, 0)
    _geojson(regions / "a.geojson", [[[[0, 0], [2048, 0], [2048, 1536], [0, 1536], [0, 0]]]])
    assert _embed(two_slides, backbone, out, capsys, *options)[0] == EXIT_NOTHING_DONE
    summary = json.loads((out / "summary.json").read_text())  # ghost, and a.h5 made otherwise: nothing done
    assert summary["counts"]["existing"] == 0 and summary["counts"]["skipped"] == 2
    # a slide whose region file is broken is skipped by name; the rest of the batch goes on
    (regions / "a.geojson").write_text("{")
    _geojson(regions / "b.geojson", [[LEFT]])
    listing.write_text("slide_id\na\nb\n")
    code, result = _embed(two_slides, backbone, tmp_path / "feats2", capsys, *options)
    summary = json.loads((tmp_path / "feats2" / "summary.json").read_text())
    assert code == EXIT_SOME_SKIPPED and [Path(p["out"]).name for p in summary["written"]] == ["b.h5"]
    assert "a.geojson: not usable GeoJSON" in summary["skipped"][0]["reason"]


def test_files_from_before_the_tiling_options_stay_complete(
    two_slides: Path, backbone: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "feats"
    code, _ = _embed(two_slides, backbone, out, capsys)
    assert code == EXIT_DONE
    for name in ("a.h5", "b.h5"):  # as an earlier version wrote them: without the new attributes
        with h5py.File(out / name, "r+") as f:
            for key in ("tissue_threshold", "otsu_clip", "overlap", "region_sha256"):
                del f.attrs[key]
    code, result = _embed(two_slides, backbone, out, capsys)
    assert code == EXIT_DONE and result["complete_before"] == 2
    code, result = _embed(two_slides, backbone, out, capsys, "data.options.tissue_threshold=15")
    assert code == EXIT_NOTHING_DONE  # other tiles: made otherwise, kept without --overwrite


def test_pretraining_uses_the_slide_list_and_regions(two_slides: Path, tmp_path: Path) -> None:
    from foundation_domains.pathology.domain import PathologyDomain

    regions = tmp_path / "regions"
    regions.mkdir()
    _geojson(regions / "b.geojson", [[LEFT]])
    listing = tmp_path / "list.csv"
    listing.write_text("path\nb.svs\nghost.svs\n")
    overrides = [
        f"data.options.slides_csv={listing}",
        f"data.options.regions={regions}",
        "data.options.mpp=1.0",
    ]
    cfg = load_config(None, [*overrides, "data.options.tile_size=64"], domain="pathology")
    source = PathologyDomain().sample_source(str(two_slides), cfg).samples
    assert source.slides == (two_slides / "b.svs",)  # ghost reported in the log, a.svs not listed
    generator = torch.Generator().manual_seed(0)
    centres = np.array([source.sample(i, generator)["coords"] + 128 for i in range(16)])
    assert ((centres >= 512) & (centres <= 1024)).all()  # every tile drawn inside the annotated half


def test_embed_takes_the_slide_list_as_a_flag(
    two_slides: Path, backbone: Path, tmp_path: Path, capsys
) -> None:
    # the flag's value is a path as typed, never read as YAML ('#' starts a comment, ': ' a map there)
    listing = tmp_path / "list #1: b.csv"
    listing.write_text("slide_id\nb\n")
    out = tmp_path / "feats"
    code, result = _embed(two_slides, backbone, out, capsys, "--slides-csv", str(listing))
    assert code == 0 and result["processed"] == 1
    assert sorted(p.name for p in out.glob("*.h5")) == ["b.h5"]

    argv = ["embed", "--domain", "pathology", "--data", str(two_slides), "--backbone", str(backbone)]
    argv += ["--out", str(tmp_path / "f2"), "--quiet", f"data.options.slides_csv={listing}"]
    assert main([*argv, "--slides-csv", str(listing)]) == 1
    assert "--slides-csv and data.options.slides_csv both given" in capsys.readouterr().err
    argv = ["embed", "--data", str(two_slides), "--backbone", str(backbone), "--out", str(tmp_path / "f3.h5")]
    assert main([*argv, "--slides-csv", str(listing), "--quiet"]) == 1  # the images domain embeds a folder
    assert "--slides-csv: the 'images' domain embeds a folder" in capsys.readouterr().err
    assert not (tmp_path / "f2").exists() and not (tmp_path / "f3.h5").exists()


def test_slide_lists_as_spreadsheets_write_them(tmp_path: Path) -> None:
    def names(text: str) -> list[str]:
        path = tmp_path / "list.csv"
        path.write_bytes(text.encode("utf-8"))
        return read_slides_csv(path)

    # a spreadsheet's booleans and CLAM's numbers in the process column; an empty cell keeps the row
    assert names("slide,process\na,TRUE\nb,FALSE\nc,1.0\nd,0\ne,\n") == ["a", "c", "e"]
    # trailing commas (a spreadsheet's empty column), a BOM, CRLF, a short row, repeated names
    assert names("\ufeffslide_id,process\r\na.svs,1,\r\nb.svs,1,,\r\nc.svs\r\na.svs,1\r\n") == [
        "a.svs",
        "b.svs",
        "c.svs",
    ]
    for text, message in [
        ("", "list.csv: a slide list needs a column slide_id or slide or path, got \\[\\] \\(an empty file"),
        ("a.svs\nb.svs\n", "got \\['a.svs'\\] \\(the first line must name the columns"),
        ("slide_id,process\na.svs,0\n", "list.csv: the slide list names no slide to process"),
        ("slide_id,process\na.svs,1\nb.svs,maybe\n", "list.csv:3: process 'maybe' is not 1 or 0"),
    ]:
        with pytest.raises(DataError, match=message):
            names(text)
    (tmp_path / "latin.csv").write_bytes("slide_id\n\xe9.svs\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv.*cannot be read.*utf-8"):
        read_slides_csv(tmp_path / "latin.csv")


def test_region_files_in_qupaths_other_shapes(tmp_path: Path) -> None:
    def region(name: str, data: object):  # noqa: ANN202
        (tmp_path / name).write_text(json.dumps(data))
        return read_region(tmp_path / name)

    line = [[600, 600], [700, 600], [800, 600], [600, 600]]  # a polygon with no area (a drawn line, closed)
    square = {"type": "Polygon", "coordinates": [LEFT]}
    inside = np.array([[600, 600], [1100, 600]])
    # a bare geometry, a GeometryCollection, one annotation Feature: every polygon with an area counts
    assert region("bare.geojson", square).contains(inside).tolist() == [True, False]
    collection = {
        "type": "GeometryCollection",
        "geometries": [square, {"type": "Point", "coordinates": [1, 1]}],
    }
    assert region("gc.geojson", collection).contains(inside).tolist() == [True, False]
    feature = {"type": "Feature", "geometry": square, "properties": {"objectType": "annotation"}}
    assert region("feature.geojson", feature).contains(inside).tolist() == [True, False]
    # an island inside a hole of a MultiPolygon's first polygon is in the region
    hole = [[600, 600], [900, 600], [900, 900], [600, 900], [600, 600]]
    island = [[700, 700], [800, 700], [800, 800], [700, 800], [700, 700]]
    multi = region("multi.geojson", {"type": "MultiPolygon", "coordinates": [[LEFT, hole], [island]]})
    assert multi.contains(np.array([[550, 550], [650, 650], [750, 750]])).tolist() == [True, False, True]
    # a zero-area polygon next to a real one is ignored; alone it is an error naming the file
    both = region("both.geojson", {"type": "MultiPolygon", "coordinates": [[line], [LEFT]]})
    assert len(both.polygons) == 1
    with pytest.raises(DataError, match="flat.geojson: its 1 polygon\\(s\\) have no area"):
        region("flat.geojson", {"type": "Polygon", "coordinates": [line]})


def test_regions_of_a_slide_qupath_crops_to_its_bounds(svs: Path, tmp_path: Path) -> None:
    from foundation_domains.pathology.regions import qupath_origin

    # QuPath opens a slide with OpenSlide bounds (MIRAX) cropped to them: its (0, 0) is our (bounds-x, bounds-y)
    bounds = {"openslide.bounds-x": "256", "openslide.bounds-y": "512"}
    bounds.update({"openslide.bounds-width": "1792", "openslide.bounds-height": "1024"})
    assert qupath_origin(bounds, (2048, 1536)) == (256, 512)
    assert qupath_origin({**bounds, "openslide.bounds-width": "2048"}, (2048, 1536)) == (
        0,
        0,
    )  # QuPath's rule
    assert qupath_origin({}, (2048, 1536)) == (0, 0)
    # the annotation of LEFT drawn in QuPath on the cropped image
    shifted = [[x - 256, y - 512] for x, y in LEFT]
    region = read_region(_geojson(tmp_path / "mirax.geojson", [[shifted]]))
    with open_slide(svs) as slide:
        _, expected = tile_slide(
            slide, 1.0, 64, TileRules(), read_region(_geojson(tmp_path / "l.geojson", [[LEFT]]))
        )
        slide.properties.update(bounds)
        _, kept = tile_slide(slide, 1.0, 64, TileRules(), region)
    np.testing.assert_array_equal(kept.coords, expected.coords)
    assert len(kept) > 0


def test_slides_with_one_name_in_two_folders_need_their_own_regions(tmp_path: Path, capsys) -> None:
    root = tmp_path / "slides"
    for case in ("x", "y"):
        (root / case).mkdir(parents=True)
        write_svs(root / case / "s.svs")
    regions = tmp_path / "regions"
    regions.mkdir()
    _geojson(regions / "s.geojson", [[LEFT]])  # whose? x/s.svs and y/s.svs are both 's' in QuPath
    with pytest.raises(DataError, match="x__s.geojson"):
        region_for(root / "x" / "s.svs", regions, name="x__s")  # embed's name for it: x__s.h5
    with pytest.raises(DataError, match="looked for s.svs.geojson "):  # s.svs beside s.tif: embed's s.svs.h5
        region_for(root / "s.svs", regions, name="s.svs")
    assert region_for(root / "s.svs", regions, name="s").path.name == "s.geojson"  # its own name: as before
    code = _qc(root, tmp_path / "qc", "--regions", str(regions))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if code != EXIT_NOTHING_DONE else {}
    assert code == EXIT_NOTHING_DONE and not report  # neither slide takes the other's annotation
    _geojson(regions / "x__s.geojson", [[LEFT]])  # named as embed names x/s.svs's feature file
    code = _qc(root, tmp_path / "qc", "--regions", str(regions))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == EXIT_SOME_SKIPPED and [Path(s["slide"]).parent.name for s in report["slides"]] == ["x"]
    assert "y__s.geojson" in report["failed"][0]["error"]
    # pretraining looks for the same names
    from foundation_domains.pathology.domain import PathologyDomain

    overrides = [f"data.options.regions={regions}", "data.options.mpp=1.0", "data.options.tile_size=64"]
    source = (
        PathologyDomain().sample_source(str(root), load_config(None, overrides, domain="pathology")).samples
    )
    assert [source.region_name(s) for s in source.slides] == ["x__s", "y__s"]
    assert len(source.tiling(root / "x" / "s.svs")) > 0
    with pytest.raises(DataError, match="y__s.geojson"):
        source.tiling(root / "y" / "s.svs")
    listing = tmp_path / "list.csv"  # names of the whole folder, as embed's: a list does not rename a slide
    listing.write_text("slide_id\ny/s.svs\n")
    overrides.append(f"data.options.slides_csv={listing}")
    source = (
        PathologyDomain().sample_source(str(root), load_config(None, overrides, domain="pathology")).samples
    )
    assert source.slides == (root / "y" / "s.svs",) and source.region_name(root / "y" / "s.svs") == "y__s"
