"""Tile grid, blending and row-strip streaming of the canopy map (domains/remote_sensing/canopy/tiling.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foundation.errors import ConfigError
from foundation_domains.remote_sensing.canopy.tiling import (
    TileGrid,
    axis_starts,
    blend_tiles,
    predict_image,
    seam_ratio,
)


class ConstantNet(torch.nn.Module):
    def __init__(self, value: float = 7.5) -> None:
        super().__init__()
        self.value, self.calls, self.tiles = value, 0, 0

    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.tiles += x.shape[0]
        return torch.full((x.shape[0], 1, *x.shape[2:]), self.value)


class FirstBand(torch.nn.Module):
    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].clone()


class EdgeArtefactNet(torch.nn.Module):
    """A zero-padded 5 x 5 mean: correct inside a tile, biased towards 0 near its border, like a CNN/ViT."""

    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x[:, :1], 5, 1, 2, count_include_pad=True)


def ramp_image(h: int, w: int, channels: int = 2) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([10 + 0.02 * yy + 0.03 * xx] * channels)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(100, 32, 8), (96, 32, 8), (20, 32, 8), (32, 32, 0)])
def test_axis_starts_cover_the_axis_inside_the_image(size: int, tile: int, overlap: int) -> None:
    starts = axis_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, size - tile)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_weights_fall_to_neighbours_and_stay_full_at_image_borders() -> None:
    grid = TileGrid(100, 100, 32, 8)
    first, mid = grid.profiles(1)[0], grid.profiles(1)[1]
    assert first[0] == 1.0 and first[-1] < 0.05  # no ramp at the image border; fades out to its neighbour
    assert mid[0] < 0.05 and mid[-1] < 0.05 and mid[16] == 1.0
    assert (grid.weight_sum(0) > 0.99).all()  # ramps of neighbours sum to one; never a zero weight


def test_overlap_over_half_a_tile_is_refused() -> None:
    with pytest.raises(ConfigError, match="--overlap"):
        TileGrid(100, 100, 32, 20)


@pytest.mark.parametrize(("h", "w"), [(131, 77), (20, 25), (32, 200), (64, 64)])
def test_constant_model_gives_a_constant_map_and_nan_where_invalid(h: int, w: int) -> None:
    image = ramp_image(h, w)
    valid = np.ones((h, w), bool)
    valid[: h // 3, : w // 4] = False
    out = predict_image(ConstantNet(), image, tile=32, overlap=8, batch_size=5, valid=valid)
    assert out.shape == (h, w) and out.dtype == np.float32
    assert np.isnan(out[~valid]).all()
    np.testing.assert_allclose(out[valid], 7.5, rtol=1e-6)


def test_tiles_without_valid_pixels_are_not_predicted() -> None:
    image = ramp_image(96, 96)
    valid = np.zeros((96, 96), bool)
    valid[70:, 70:] = True
    net = ConstantNet()
    predict_image(net, image, tile=32, overlap=0, batch_size=4, valid=valid)
    assert net.tiles == 1  # only the bottom-right tile of the 3 x 3 grid has valid pixels


@pytest.mark.parametrize("chunk_width", [32, 70, 1000])
def test_streamed_rows_equal_the_in_memory_map_and_come_out_early(chunk_width: int) -> None:
    h, w = 150, 110
    image = ramp_image(h, w)
    expected = predict_image(EdgeArtefactNet(), image, tile=32, overlap=8, batch_size=3)
    out = np.full((h, w), -1.0, np.float32)
    events: list[tuple[str, int]] = []

    def read(r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        events.append(("read", r0))
        return image[:, r0:r1, c0:c1].copy(), np.ones((r1 - r0, c1 - c0), bool)

    def on_rows(r0: int, rows: np.ndarray) -> None:
        events.append(("rows", r0))
        assert len(rows) <= 32  # never more than a tile's rows held back
        out[r0 : r0 + len(rows)] = rows

    grid = TileGrid(h, w, 32, 8)
    blend_tiles(EdgeArtefactNet(), read, grid, on_rows, batch_size=3, chunk_width=chunk_width)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    row_starts = [r for kind, r in events if kind == "rows"]
    assert row_starts == sorted(row_starts) and row_starts[0] == 0
    first_rows = events.index(("rows", 0))
    assert first_rows < len(events) - 2 and ("read", grid.ys[-1]) in events[first_rows:]  # streamed


def test_identity_model_reproduces_a_smooth_input_exactly() -> None:
    image = ramp_image(90, 140)
    out = predict_image(FirstBand(), image, tile=32, overlap=8)
    np.testing.assert_allclose(out, image[0], rtol=1e-6)


def test_blending_removes_the_seams_of_a_model_with_edge_artefacts() -> None:
    image = ramp_image(160, 224)
    blended = predict_image(EdgeArtefactNet(), image, tile=32, overlap=8)
    hard = predict_image(EdgeArtefactNet(), image, tile=32, overlap=0)
    assert seam_ratio(hard, TileGrid(160, 224, 32, 0)) > 3  # the measure sees seams of unblended tiles
    assert seam_ratio(blended, TileGrid(160, 224, 32, 8)) < 1.2
