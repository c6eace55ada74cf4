"""Canopy-height metrics over any number of images, kept as running sums (bounded memory).

Pixel MAE, RMSE, R^2 and bias; block R^2 on 50 x 50 px block means (Tolan et al. 2023, arXiv 2304.07213);
MAE / bias / count per label-height bin (edges 0, 2, 5, 10, 15, 20, 30, 60 m) and tree-cover IoU at 2 m
(Open-Canopy protocol). Only pixels with a finite label (and a finite prediction) count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

HEIGHT_BIN_EDGES = (0.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, math.inf)
TREE_HEIGHT = 2.0  # metres: a pixel is tree cover when its height is >= this
BLOCK = 50  # pixels, side of the blocks of block R^2
BLOCK_MIN_VALID = 0.5  # a block counts when at least half of its pixels have a label
DENSITY_MAX = (
    60.0  # metres: the predicted-vs-true density grid covers 0-60 m (higher values in the last cell)
)
DENSITY_CELLS = 120  # 0.5 m cells


class _Moments:
    """Sums for MAE, RMSE, R^2 and bias of pairs (prediction, label), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.abs = self.sq = self.err = self.y = self.y2 = 0.0

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        p, y = pred.astype(np.float64), label.astype(np.float64)
        d = p - y
        self.n += len(y)
        self.abs += float(np.abs(d).sum())
        self.sq += float((d * d).sum())
        self.err += float(d.sum())
        self.y += float(y.sum())
        self.y2 += float((y * y).sum())

    def r2(self) -> float | None:
        """1 - SS_res / SS_tot; None when undefined (fewer than 2 values or a constant label)."""
        if self.n < 2:
            return None
        ss_tot = self.y2 - self.y * self.y / self.n
        if ss_tot <= 1e-12 * max(self.y2, 1.0):
            return None
        return 1.0 - self.sq / ss_tot


def block_means(values: np.ndarray, valid: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` over the valid pixels of each ``block x block`` tile (edge tiles partial), and
    whether the tile has enough valid pixels (``BLOCK_MIN_VALID`` of its own area)."""
    h, w = values.shape
    ph, pw = -h % block, -w % block
    v = np.pad(np.where(valid, values, 0.0).astype(np.float64), ((0, ph), (0, pw)))
    m = np.pad(valid.astype(np.float64), ((0, ph), (0, pw)))
    area = np.pad(np.ones((h, w)), ((0, ph), (0, pw)))
    shape = ((h + ph) // block, block, (w + pw) // block, block)
    sums = v.reshape(shape).sum(axis=(1, 3))
    counts = m.reshape(shape).sum(axis=(1, 3))
    areas = area.reshape(shape).sum(axis=(1, 3))
    ok = counts >= BLOCK_MIN_VALID * areas
    return sums / np.maximum(counts, 1), ok


def _plane(x: np.ndarray) -> np.ndarray:
    """``H x W`` (or ``1 x H x W``) float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected an H x W map, got shape {x.shape}")
    return x


class CanopyMetrics:
    """Accumulate ``add(pred, label)`` over images, then ``compute()`` one JSON-able dict."""

    def __init__(self, edges: tuple[float, ...] = HEIGHT_BIN_EDGES, block: int = BLOCK) -> None:
        self.edges = edges
        self.block = block
        self.pixels = _Moments()
        self.blocks = _Moments()
        nbins = len(edges) - 1
        self.bin_count = np.zeros(nbins, dtype=np.int64)
        self.bin_abs = np.zeros(nbins)
        self.bin_err = np.zeros(nbins)
        self.bin_sq = np.zeros(nbins)
        # (label, prediction) pair counts on a fixed grid: the density plot, in bounded memory
        self.density = np.zeros((DENSITY_CELLS, DENSITY_CELLS), dtype=np.int64)
        self.tree_inter = 0
        self.tree_union = 0
        self.images = 0

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        """One image: ``pred`` and ``label`` are ``H x W`` metres; NaN labels (nodata) are ignored."""
        pred, label = _plane(pred), _plane(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        valid = np.isfinite(label) & np.isfinite(pred)
        self.images += 1
        p, y = pred[valid], label[valid]
        self.pixels.add(p, y)
        bp, ok_p = block_means(pred, valid, self.block)
        by, _ = block_means(label, valid, self.block)
        self.blocks.add(bp[ok_p], by[ok_p])
        idx = np.clip(np.searchsorted(self.edges, y, side="right") - 1, 0, len(self.edges) - 2)
        d = p - y
        self.bin_count += np.bincount(idx, minlength=len(self.bin_count))
        self.bin_abs += np.bincount(idx, weights=np.abs(d), minlength=len(self.bin_count))
        self.bin_err += np.bincount(idx, weights=d, minlength=len(self.bin_count))
        self.bin_sq += np.bincount(idx, weights=d * d, minlength=len(self.bin_count))
        cells = [
            np.clip((v / DENSITY_MAX * DENSITY_CELLS).astype(np.int64), 0, DENSITY_CELLS - 1) for v in (y, p)
        ]
        np.add.at(self.density, (cells[0], cells[1]), 1)
        tree_p, tree_y = p >= TREE_HEIGHT, y >= TREE_HEIGHT
        self.tree_inter += int((tree_p & tree_y).sum())
        self.tree_union += int((tree_p | tree_y).sum())

    def compute(self) -> dict[str, Any]:
        """MAE, RMSE, R^2, block R^2, bias, per-height-bin errors, tree-cover IoU; None where undefined."""
        m, n = self.pixels, self.pixels.n
        bins = []
        for i in range(len(self.bin_count)):
            lo, hi = self.edges[i], self.edges[i + 1]
            c = int(self.bin_count[i])
            bins.append(
                {
                    "range": f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">={lo:g}",
                    "count": c,
                    "mae": float(self.bin_abs[i] / c) if c else None,
                    "bias": float(self.bin_err[i] / c) if c else None,
                    "error_std": _std(self.bin_sq[i], self.bin_err[i], c),
                }
            )
        return {
            "images": self.images,
            "pixels": n,
            "mae": m.abs / n if n else None,
            "rmse": math.sqrt(m.sq / n) if n else None,
            "r2": m.r2(),
            "block_r2": self.blocks.r2(),
            "blocks": self.blocks.n,
            "bias": m.err / n if n else None,
            "label_mean": m.y / n if n else None,
            "tree_cover_iou": self.tree_inter / self.tree_union if self.tree_union else None,
            "height_bins": bins,
        }


def _std(sq: float, total: float, n: int) -> float | None:
    """Standard deviation of the errors from their sums (population; None for an empty bin)."""
    if not n:
        return None
    return math.sqrt(max(0.0, sq / n - (total / n) ** 2))


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric top-level metrics (for ``metrics.jsonl``), undefined ones left out."""
    keys = ("mae", "rmse", "r2", "block_r2", "bias", "tree_cover_iou")
    return {k: float(result[k]) for k in keys if result.get(k) is not None}
