"""Overlapping tiles, smooth blending and row-strip streaming for dense prediction over large rasters.

A map is predicted tile by tile (``tile`` pixels, neighbours sharing ``overlap`` pixels; the last tile of a
row/column is shifted back so every tile lies inside the image, and a scene smaller than one tile is padded
by reflection). Each prediction is weighted by a separable window that is 1 inside the tile and falls to 0
over the ``overlap`` pixels shared with a neighbour (``sin^2``, the outermost quarter of the overlap at 0 so
a network's edge artefacts never reach the map; no fall on sides that touch the image border), and the map
is ``sum(weight * prediction) / sum(weight)``. Adjacent ramps sum to one, so there are no seams
(shared/reference/remote_sensing.md: "2D Hann (or similar) weight per tile, accumulate, divide").

Because the window and the grid are separable, ``sum(weight)`` is an outer product of two 1D profiles and is
never stored; only the weighted sums of the rows still open are kept (about ``tile x width`` floats), and
rows are handed to ``on_rows`` as soon as no later tile touches them. Input is read in chunks of at most
``chunk_width`` columns, one chunk ahead on a thread, so memory does not grow with the scene.

:func:`predict_image` is the in-memory entry point (evaluation); :func:`blend_tiles` the streaming engine the
map CLI uses with a raster reader.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from foundation.errors import ConfigError
from foundation.precision import autocast_dtype  # also imported from here (benchmarks)
from foundation.train.distributed import resolve_device

# read(row0, row1, col0, col1) -> (C x h x w float32 normalised, invalid pixels already 0; h x w bool valid)
# or the same plus an h x w bool mask of the pixels invalid because a value is NaN or infinite (counted).
ReadFn = Callable[[int, int, int, int], tuple[np.ndarray, ...]]
# on_rows(row0, rows h x W float32 with NaN where invalid)
RowsFn = Callable[[int, np.ndarray], None]


class Chunk(NamedTuple):
    """What a ``ReadFn`` gives for one window."""

    image: np.ndarray
    valid: np.ndarray
    nonfinite: np.ndarray | None = None


class PixelCounts(NamedTuple):
    """Pixels of the map with an input to predict from, and pixels left out for NaN/infinite input."""

    valid: int
    nonfinite: int


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: stride ``tile - overlap``, the last one flush with the far edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(overlap: int) -> np.ndarray:
    """Fade-in over ``overlap`` px: 0, ``sin^2``, 1 over its quarter, half and quarter.

    The outer quarter is 0 because tile edges carry the network's border artefacts (the neighbour covers
    them at full weight). ``ramp(t) + ramp(overlap - 1 - t) == 1``: neighbours always share weight one.
    """
    margin = overlap // 4
    n = overlap - 2 * margin
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.concatenate([np.zeros(margin), np.sin(0.5 * math.pi * t) ** 2, np.ones(margin)])


def axis_profile(start: int, size: int, tile: int, overlap: int) -> np.ndarray:
    """Weights of the tile at ``start`` along one axis (length ``min(tile, size)``)."""
    n = min(tile, size)
    w = np.ones(n, dtype=np.float64)
    if overlap > 0 and size > tile:
        ramp = _ramp(overlap)
        if start > 0:  # a neighbour before: fade in
            w[:overlap] = ramp
        if start + n < size:  # a neighbour after: fade out
            w[-overlap:] = ramp[::-1]
    return w


@dataclass(frozen=True)
class TileGrid:
    """Tile positions and blending weights of an ``height x width`` image."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...] = field(init=False)
    xs: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ConfigError(f"tile size {self.tile!r} must be positive")
        if not 0 <= 2 * self.overlap <= self.tile:
            raise ConfigError(
                f"--overlap {self.overlap!r} must be between 0 and half the tile size ({self.tile // 2})"
            )
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image of {self.height} x {self.width} pixels is empty")
        object.__setattr__(self, "ys", tuple(axis_starts(self.height, self.tile, self.overlap)))
        object.__setattr__(self, "xs", tuple(axis_starts(self.width, self.tile, self.overlap)))

    @property
    def tile_h(self) -> int:
        return min(self.tile, self.height)

    @property
    def tile_w(self) -> int:
        return min(self.tile, self.width)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def profiles(self, axis: int) -> list[np.ndarray]:
        """One weight profile per tile start along ``axis`` (0: rows, 1: columns)."""
        size, starts = (self.height, self.ys) if axis == 0 else (self.width, self.xs)
        return [axis_profile(s, size, self.tile, self.overlap) for s in starts]

    def weight_sum(self, axis: int) -> np.ndarray:
        """``sum(weight)`` along ``axis``; the 2D sum is the outer product of both (all > 0)."""
        size, starts = (self.height, self.ys) if axis == 0 else (self.width, self.xs)
        total = np.zeros(size, dtype=np.float64)
        for s, w in zip(starts, self.profiles(axis), strict=True):
            total[s : s + len(w)] += w
        return total


def launch_batch(
    net: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start ``net.predict_height`` on ``B x C x t x t`` tiles; on CUDA the result is copied back
    asynchronously (pinned memory + event), so the host can blend the previous batch meanwhile."""
    x = torch.from_numpy(batch)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.inference_mode():
        with ctx:
            out = net.predict_height(x)[:, 0].float()
        if device.type != "cuda":
            return out, None
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def collect_batch(handle: tuple[torch.Tensor, torch.cuda.Event | None]) -> np.ndarray:
    """Wait for :func:`launch_batch`'s result: ``B x t x t`` float32 metres."""
    out, done = handle
    if done is not None:
        done.synchronize()
    return out.numpy()


def predict_batch(
    net: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: torch.dtype | None
) -> np.ndarray:
    """``net.predict_height`` on ``B x C x t x t`` normalised tiles -> ``B x t x t`` float32 metres."""
    return collect_batch(launch_batch(net, batch, device, amp))


def _classes(profiles: list[np.ndarray]) -> list[int]:
    """Index of the first identical profile for each (most tiles share one: the 2D weights are cached)."""
    seen: dict[bytes, int] = {}
    return [seen.setdefault(p.tobytes(), i) for i, p in enumerate(profiles)]


def _pad_tile(x: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad a ``C x h x w`` tile to ``tile x tile`` (scenes smaller than one tile)."""
    ph, pw = tile - x.shape[1], tile - x.shape[2]
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="symmetric")


def _chunk_plan(grid: TileGrid, chunk_width: int) -> list[tuple[int, int, int]]:
    """(strip index, first tile column, end tile column) in reading order; chunks span <= chunk_width px."""
    plan = []
    for k in range(len(grid.ys)):
        j0 = 0
        while j0 < len(grid.xs):
            j1 = j0 + 1
            while j1 < len(grid.xs) and grid.xs[j1] + grid.tile_w - grid.xs[j0] <= chunk_width:
                j1 += 1
            plan.append((k, j0, j1))
            j0 = j1
    return plan


def _prefetched(read: ReadFn, grid: TileGrid, plan: list[tuple[int, int, int]]) -> Iterator[tuple]:
    """Read each chunk of ``plan`` one step ahead on a thread (GDAL releases the GIL while decoding)."""

    def load(item: tuple[int, int, int]) -> tuple:
        k, j0, j1 = item
        y0, x0 = grid.ys[k], grid.xs[j0]
        return read(y0, y0 + grid.tile_h, x0, grid.xs[j1 - 1] + grid.tile_w)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-read") as pool:
        future = pool.submit(load, plan[0]) if plan else None
        for i, item in enumerate(plan):
            data = future.result()
            future = pool.submit(load, plan[i + 1]) if i + 1 < len(plan) else None
            yield item, data


class _RowAccumulator:
    """Weighted sums and validity of the rows not yet finished; finished rows go to ``on_rows``."""

    def __init__(self, grid: TileGrid, on_rows: RowsFn) -> None:
        self.grid, self.on_rows = grid, on_rows
        self.wy, self.wx = grid.weight_sum(0), grid.weight_sum(1)
        self.base = 0  # first row held
        self.sums = np.zeros((0, grid.width), dtype=np.float32)
        self.valid = np.zeros((0, grid.width), dtype=bool)
        self.nonfinite = np.zeros((0, grid.width), dtype=bool)
        self.valid_pixels = 0
        self.nonfinite_pixels = 0

    def ensure(self, end_row: int) -> None:
        extra = end_row - self.base - len(self.sums)
        if extra > 0:
            self.sums = np.concatenate([self.sums, np.zeros((extra, self.grid.width), np.float32)])
            self.valid = np.concatenate([self.valid, np.zeros((extra, self.grid.width), bool)])
            self.nonfinite = np.concatenate([self.nonfinite, np.zeros((extra, self.grid.width), bool)])

    def add_valid(self, y0: int, x0: int, valid: np.ndarray, nonfinite: np.ndarray | None) -> None:
        h, w = valid.shape
        rows, cols = slice(y0 - self.base, y0 - self.base + h), slice(x0, x0 + w)
        self.valid[rows, cols] |= valid
        if nonfinite is not None:
            self.nonfinite[rows, cols] |= nonfinite

    def add(self, y0: int, x0: int, weighted: np.ndarray) -> None:
        h, w = weighted.shape
        self.sums[y0 - self.base : y0 - self.base + h, x0 : x0 + w] += weighted

    def flush(self, end_row: int) -> None:
        """Rows ``[base, end_row)`` are final: divide, mark invalid NaN, hand over, drop."""
        n = end_row - self.base
        if n <= 0:
            return
        rows = self.sums[:n] / np.outer(self.wy[self.base : end_row], self.wx).astype(np.float32)
        valid = self.valid[:n]
        rows[~valid] = np.nan
        self.valid_pixels += int(valid.sum())
        self.nonfinite_pixels += int(self.nonfinite[:n].sum())
        self.on_rows(self.base, rows)
        self.sums, self.valid = self.sums[n:].copy(), self.valid[n:].copy()
        self.nonfinite = self.nonfinite[n:].copy()
        self.base = end_row


def blend_tiles(
    net: torch.nn.Module,
    read: ReadFn,
    grid: TileGrid,
    on_rows: RowsFn,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    chunk_width: int = 2048,
    progress: Callable[[int], object] | None = None,
) -> PixelCounts:
    """Predict every tile of ``grid``, blend, and emit finished rows in order; returns the pixels predicted
    and those left out for NaN/infinite input (when ``read`` reports them).

    Args:
        net: has ``predict_height(B x C x t x t) -> B x 1 x t x t``; eval mode, on ``device``.
        read: gives normalised pixels (invalid set to 0) and the valid mask of a window.
        on_rows: receives each finished block of rows (float32, NaN where the input is invalid).
        batch_size: tiles per forward; batches run across strip boundaries so the device stays busy.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (bf16 on CUDA).
        chunk_width: widest window read at once (bounds memory for very wide scenes).
        progress: called with the number of tiles finished after each batch (e.g. ``tqdm.update``).

    Tiles without any valid pixel are not predicted (their pixels are NaN anyway).
    """
    dev = resolve_device(device)
    amp = autocast_dtype(precision, dev)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be positive")
    acc = _RowAccumulator(grid, on_rows)
    py, px = grid.profiles(0), grid.profiles(1)
    plan = _chunk_plan(grid, max(chunk_width, grid.tile_w))
    strip_left = [len(grid.xs)] * len(grid.ys)  # tiles of each strip not yet accumulated
    next_flush = 0  # first strip whose rows are not flushed yet
    cy, cx = _classes(py), _classes(px)
    weights: dict[tuple[int, int], np.ndarray] = {}
    pending: list[tuple[int, int, np.ndarray]] = []  # (strip, column, tile) waiting for a batch
    inflight: list[tuple[list[tuple[int, int]], tuple]] = []  # batches launched, not yet blended
    depth = 1 if dev.type == "cuda" else 0  # batches left running on the GPU while the host blends

    def strips_done(strips: list[int]) -> None:
        # A strip's rows above the next strip are final once all its tiles are in: no later tile reaches them.
        nonlocal next_flush
        for k in strips:
            strip_left[k] -= 1
        while next_flush < len(grid.ys) and strip_left[next_flush] == 0:
            last = next_flush + 1 == len(grid.ys)
            acc.flush(grid.height if last else grid.ys[next_flush + 1])
            next_flush += 1
        if progress is not None and strips:
            progress(len(strips))

    def blend_oldest() -> None:
        items, handle = inflight.pop(0)
        for (k, j), p in zip(items, collect_batch(handle), strict=True):
            key = (cy[k], cx[j])
            if key not in weights:
                weights[key] = np.outer(py[k], px[j]).astype(np.float32)
            acc.add(grid.ys[k], grid.xs[j], p[: grid.tile_h, : grid.tile_w] * weights[key])
        strips_done([k for k, _ in items])

    def launch() -> None:
        handle = launch_batch(net, np.stack([t for _, _, t in pending]), dev, amp)
        inflight.append(([(k, j) for k, j, _ in pending], handle))
        pending.clear()
        while len(inflight) > depth:
            blend_oldest()

    for (k, j0, j1), chunk in _prefetched(read, grid, plan):
        image, valid, nonfinite = Chunk(*chunk)
        y0, c0 = grid.ys[k], grid.xs[j0]
        acc.ensure(y0 + grid.tile_h)
        acc.add_valid(y0, c0, valid, nonfinite)
        for j in range(j0, j1):
            a = grid.xs[j] - c0
            if not valid[:, a : a + grid.tile_w].any():
                strips_done([k])  # nothing to predict; a strip still open waits for its pending tiles
                continue
            pending.append((k, j, _pad_tile(image[:, :, a : a + grid.tile_w], grid.tile)))
            if len(pending) == batch_size:
                launch()
    if pending:
        launch()
    while inflight:
        blend_oldest()
    return PixelCounts(acc.valid_pixels, acc.nonfinite_pixels)


def predict_image(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    tile: int,
    overlap: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    valid: np.ndarray | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Blended prediction of an in-memory image: ``C x H x W`` normalised float32 -> ``H x W`` float32.

    Args:
        net: eval-mode network with ``predict_height``, already on ``device``.
        image: normalised pixels (as the network was trained on).
        tile: tile side (a multiple of the backbone's patch size).
        overlap: pixels shared by neighbouring tiles (at most ``tile // 2``; 64 for 256-px tiles).
        valid: ``H x W`` bool; invalid pixels are fed as 0 (the normalised mean) and come out NaN.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto``.
    """
    if image.ndim != 3:
        raise ConfigError(f"predict_image expects C x H x W, got shape {image.shape}")
    _, h, w = image.shape
    grid = TileGrid(h, w, tile, overlap)
    image = np.asarray(image, dtype=np.float32)
    if valid is None:
        valid = np.ones((h, w), dtype=bool)
    valid = valid & np.isfinite(image).all(axis=0)
    out = np.full((h, w), np.nan, dtype=np.float32)

    def read(r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        v = valid[r0:r1, c0:c1]
        return np.where(v, image[:, r0:r1, c0:c1], np.float32(0)), v

    def on_rows(r0: int, rows: np.ndarray) -> None:
        out[r0 : r0 + len(rows)] = rows

    blend_tiles(
        net, read, grid, on_rows, batch_size=batch_size, device=device, precision=precision, chunk_width=w
    )
    return out


def seam_positions(grid: TileGrid, axis: int) -> list[int]:
    """Where neighbouring tiles meet along ``axis``: the middle of each overlap (the tile edge if none)."""
    starts = grid.ys if axis == 0 else grid.xs
    return [(b + a + grid.tile) // 2 for a, b in zip(starts, starts[1:], strict=False)]


def seam_ratio(heights: np.ndarray, grid: TileGrid, band: int = 2) -> float:
    """Mean absolute gradient across tile seams over that in tile interiors (1 = invisible seams).

    Steps between neighbouring pixels within ``band`` px of a seam count as "seam"; steps at least a
    quarter tile from every seam as "interior" (both at least a quarter tile from the image border); both
    axes pooled, NaN ignored.
    """
    seam, inner = [], []
    quarter = grid.tile / 4
    for axis in (0, 1):
        g = np.abs(np.diff(heights, axis=axis))  # step between pixel i and i + 1 along axis
        n = g.shape[axis]
        seams = np.array(seam_positions(grid, axis), dtype=np.float64)
        if not len(seams):
            continue
        pos = np.arange(n) + 0.5
        dist = np.abs(pos[:, None] - seams[None, :]).min(axis=1)
        inside = (pos >= quarter) & (pos <= n - quarter)  # image borders have their own edge effects
        seam.append(np.take(g, np.flatnonzero(inside & (dist <= band)), axis=axis).ravel())
        inner.append(np.take(g, np.flatnonzero(inside & (dist >= quarter)), axis=axis).ravel())
    if not seam:
        return 1.0
    return float(np.nanmean(np.concatenate(seam)) / np.nanmean(np.concatenate(inner)))
