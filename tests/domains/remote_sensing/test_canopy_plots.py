"""Canopy-height error pictures: the density grid and per-bin spread they are drawn from, and the PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from foundation.errors import OutputError
from foundation.plotting import is_our_png
from foundation_domains.remote_sensing.canopy.metrics import DENSITY_CELLS, DENSITY_MAX, CanopyMetrics
from foundation_domains.remote_sensing.canopy.plots import check_error_plots, write_error_plots


def test_density_counts_and_bin_spread() -> None:
    m = CanopyMetrics(block=2)
    label = np.array([[1.0, 1.2, 12.0, np.nan], [80.0, 3.0, 3.0, 3.0]])
    pred = np.array([[1.0, 2.2, 10.0, 5.0], [70.0, 4.0, 2.0, 3.0]])
    m.add(pred, label)
    cell = DENSITY_MAX / DENSITY_CELLS
    assert m.density.sum() == 7  # the NaN label is not counted
    assert m.density[int(1.0 / cell), int(1.0 / cell)] == 1 and m.density[int(12 / cell), int(10 / cell)] == 1
    assert m.density[-1, -1] == 1  # beyond the grid: the last cell
    bins = {b["range"]: b for b in m.compute()["height_bins"]}
    assert bins["2-5"]["error_std"] == pytest.approx(np.std([1.0, -1.0, 0.0]))
    assert bins["0-2"]["error_std"] == pytest.approx(0.5) and bins["5-10"]["error_std"] is None


def test_plots_written_as_ours_and_foreign_files_refused(tmp_path) -> None:
    rng = np.random.default_rng(0)
    m = CanopyMetrics()
    y = rng.uniform(0, 40, (60, 60))
    m.add(y + rng.normal(0, 3, y.shape), y)
    paths = write_error_plots(m, tmp_path / "eval", "test")
    for p in paths.values():
        assert is_our_png(tmp_path / p)
        with Image.open(p) as im:
            assert im.width > 300 and len(np.unique(np.asarray(im.convert("L")))) > 20
    check_error_plots(tmp_path / "eval", [])  # ours: may be replaced
    (tmp_path / "eval_height_bins.png").write_text("notes")
    with pytest.raises(OutputError, match="eval_height_bins.png exists and is not a plot of ours"):
        check_error_plots(tmp_path / "eval", [])
    with pytest.raises(OutputError, match="is .or holds. the input"):
        check_error_plots(tmp_path / "x", [tmp_path / "x_density.png"])
