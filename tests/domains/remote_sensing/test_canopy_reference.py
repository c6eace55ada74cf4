"""``canopy-height --quicklook --labels REF``: density and height-bin plots of a map against a reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from canopy_testdata import ConstantNet, meta_for, opts, write_checkpoint
from rs_testdata import random_bands, write_raster

from foundation.cli import main
from foundation.plotting import is_our_png
from foundation_domains.remote_sensing.canopy.mapping import map_scene
from foundation_domains.remote_sensing.canopy.reference import compare, find_reference


def _scene_and_reference(root: Path, name: str = "a", size: int = 40) -> tuple[Path, Path]:
    src = write_raster(root / "scenes" / f"{name}.tif", random_bands(4, size, size, "uint16"))
    heights = np.tile(np.linspace(0, 30, size, dtype=np.float32), (size, 1))[None]
    heights[:, :5] = -1  # no reference there
    return src, write_raster(root / "ref" / f"{name}.tif", heights, nodata=-1)


def test_map_compared_with_its_reference(tmp_path: Path) -> None:
    src, ref = _scene_and_reference(tmp_path)
    assert find_reference(src, str(tmp_path / "ref")) == ref and find_reference(src, str(ref)) == ref
    assert find_reference(tmp_path / "other.tif", str(tmp_path / "ref")) is None
    dst = tmp_path / "out" / "a_chm.tif"
    dst.parent.mkdir()
    summary = map_scene(
        ConstantNet(), meta_for(4), src, dst, opts(quicklook=True, labels=str(tmp_path / "ref"))
    )
    assert summary["reference"] == str(ref)
    assert summary["plots"] == {
        "density": str(tmp_path / "out" / "a_chm_density.png"),
        "height_bins": str(tmp_path / "out" / "a_chm_height_bins.png"),
    }
    assert all(is_our_png(Path(p)) for p in summary["plots"].values())
    metrics = compare(dst, ref)  # the constant 12.25 m against heights 0..30 m, 35 labelled rows
    y = np.linspace(0, 30, 40)
    assert metrics.pixels.n == 35 * 40
    assert summary["reference_metrics"]["bias"] == pytest.approx(12.25 - y.mean(), abs=1e-4)
    assert metrics.density[:, int(12.25 / 0.5)].sum() == 35 * 40  # every prediction in the 12-12.5 m column


def test_cli_needs_quicklook_and_names_a_bad_reference(tmp_path: Path, capsys) -> None:
    src, ref = _scene_and_reference(tmp_path)
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    argv = ["canopy-height", str(src), "--checkpoint", str(checkpoint), "--quiet", "--labels", str(ref)]
    assert main([*argv, "--out", str(tmp_path / "m.tif")]) == 1
    assert "add --quicklook" in capsys.readouterr().err
    far = write_raster(tmp_path / "far.tif", np.ones((1, 8, 8), np.float32), crs="EPSG:32610")
    argv[-1] = str(far)
    assert main([*argv, "--out", str(tmp_path / "m.tif"), "--quicklook"]) == 0  # the map is done all the same
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "done" and "does not overlap" in line["reference_error"]
    assert not (tmp_path / "m_density.png").exists()
