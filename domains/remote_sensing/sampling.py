"""The pretraining stream: random windows from many rasters, mostly valid pixels, in reflectance-like units.

Sample ``i`` is a function of the generator the core seeds with ``(seed, i)``: which raster (area-weighted,
so every pixel of the collection is equally likely), where the window lies, and the retries when a window
falls on too much nodata (moved onto its valid pixels, or drawn again). A window that cannot be read (a
truncated or corrupt file) or holds no valid pixel at all (nodata, NaN, infinity) is drawn again from the same
generator; the file is named in the log once. The draw never depends on what failed before in this process,
so sample ``i`` is the same on any number of workers and after a resume. Each process opens files lazily and
keeps a few handles; handles never cross a ``fork`` or a pickle.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from foundation.errors import DataError
from foundation_domains.remote_sensing.raster import (
    READ_ERRORS,
    REMOTE_TRIES,
    RasterInfo,
    UnreadableRasterError,
    is_remote,
    open_dataset,
    read_error_text,
    read_window,
)

log = logging.getLogger(__name__)

MAX_OPEN = 16  # open datasets kept per worker
MAX_DRAWS = 1000  # windows drawn for one sample (failed reads included) before it gives up


class RasterSampleSource:
    """Endless stream of ``{"image": H x W x C float32, "mask", "path", "window", "bounds"}`` samples.

    Args:
        infos: the rasters (same channel count).
        scales: per-raster divisor to reflectance-like units.
        fill: per-band value for invalid pixels, in the same units (the band mean: zero after normalisation).
        window: side of the windows read; rasters smaller than that give their whole extent.
        min_valid: smallest accepted fraction of valid pixels in a window.
        max_tries: readable windows drawn before settling for the most valid one seen.
        nodata: extra nodata value (raw units) for files that declare none.

    Raises (from :meth:`sample`):
        DataError: no readable window with a valid pixel in ``MAX_DRAWS`` draws (the broken files named).
    """

    def __init__(
        self,
        infos: Sequence[RasterInfo],
        scales: Sequence[float],
        fill: Sequence[float],
        *,
        window: int,
        min_valid: float = 0.8,
        max_tries: int = 20,
        nodata: float | None = None,
    ) -> None:
        self.infos = list(infos)
        self.scales = np.asarray(scales, dtype=np.float32)
        self.fill = np.asarray(fill, dtype=np.float32)
        self.window = window
        self.min_valid = min_valid
        self.max_tries = max_tries
        self.nodata = nodata
        self.weights = torch.tensor([float(i.width * i.height) for i in self.infos], dtype=torch.float64)
        self.broken: set[str] = set()  # files with a failed read, named once in the log
        self._unopenable: set[int] = set()  # every draw of a file GDAL cannot open fails: skip the read
        self.sparse_windows = 0  # samples that settled for fewer valid pixels than min_valid
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own files
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _dataset(self, index: int) -> rasterio.io.DatasetReader:
        if self._pid != os.getpid():  # forked worker: never use the parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if index in self._handles:
            self._handles.move_to_end(index)
            return self._handles[index]
        if len(self._handles) >= MAX_OPEN:
            self._handles.popitem(last=False)[1].close()
        self._handles[index] = open_dataset(self.infos[index].path)
        return self._handles[index]

    def _draw(self, generator: torch.Generator) -> tuple[int, Window]:
        f = int(torch.multinomial(self.weights, 1, generator=generator))
        info = self.infos[f]
        w, h = min(self.window, info.width), min(self.window, info.height)
        col = int(torch.randint(0, info.width - w + 1, (1,), generator=generator))
        row = int(torch.randint(0, info.height - h + 1, (1,), generator=generator))
        return f, Window(col, row, w, h)

    def _recentre(self, f: int, win: Window, valid: np.ndarray) -> Window | None:
        """The window moved onto the centroid of its valid pixels (None if it would not move).

        Near the edge of the valid area (an orbit edge, a coastline of nodata) a random draw often lands half
        outside; one or two such moves bring it inside at the cost of a read each.
        """
        rows, cols = np.nonzero(valid)
        info = self.infos[f]
        col = int(round(win.col_off + cols.mean() - (win.width - 1) / 2))
        row = int(round(win.row_off + rows.mean() - (win.height - 1) / 2))
        col = min(max(col, 0), info.width - int(win.width))
        row = min(max(row, 0), info.height - int(win.height))
        if (col, row) == (win.col_off, win.row_off):
            return None
        return Window(col, row, win.width, win.height)

    def _read(self, generator: torch.Generator) -> tuple[float, int, Window, np.ndarray, np.ndarray]:
        """Draw windows until one has ``min_valid`` valid pixels; else the best of ``max_tries`` reads.

        Unreadable windows and windows without a single valid pixel do not count as tries: another window is
        drawn, up to ``MAX_DRAWS`` in all.
        """
        best = None
        f, win = -1, None
        tries = 0
        for _ in range(MAX_DRAWS):
            if win is None:
                f, win = self._draw(generator)
            pixels = self._read_window(f, win)
            if pixels is None:
                win = None
                continue
            image, valid = pixels
            frac = float(valid.mean())
            if frac > 0:
                tries += 1
                if best is None or frac > best[0]:
                    best = (frac, f, win, image, valid)
            if best is not None and (best[0] >= self.min_valid or tries >= self.max_tries):
                break
            win = self._recentre(f, win, valid) if frac > 0 else None
        if best is None:
            broken = f" (unreadable: {', '.join(sorted(self.broken))})" if self.broken else ""
            raise DataError(f"no readable window with a valid pixel in {MAX_DRAWS} draws{broken}")
        return best

    def _read_window(self, f: int, win: Window) -> tuple[np.ndarray, np.ndarray] | None:
        """The window's pixels and valid mask, or None when the file fails to open or to read it.

        A URL's failed read is tried again on a freshly opened dataset (GDAL has retried each request
        already; a reopen also drops what a cut transfer left in its caches) before the file counts as broken.
        """
        if f in self._unopenable:
            return None
        tries = REMOTE_TRIES if is_remote(self.infos[f].path) else 1
        for attempt in range(tries):
            try:
                return read_window(self._dataset(f), self.infos[f].bands, win, self.nodata)
            except READ_ERRORS as e:
                if attempt + 1 < tries and not isinstance(e, UnreadableRasterError):
                    self._forget(f)
                    continue
                self._note_broken(f, e)
                return None  # unopenable (open_dataset has made its own tries), or out of tries
        return None

    def _forget(self, f: int) -> None:
        """Close file ``f``'s handle, so the next read opens it again."""
        handle = self._handles.pop(f, None)
        if handle is not None:
            handle.close()

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        frac, f, win, image, valid = self._read(generator)
        if frac < self.min_valid:
            self.sparse_windows += 1
            if self.sparse_windows in (1, 100, 10000):
                log.warning(
                    "%d window(s) had fewer than %.0f%% valid pixels after %d tries (last: %s, %.0f%%)",
                    self.sparse_windows, 100 * self.min_valid, self.max_tries, self.infos[f].path, 100 * frac,
                )  # fmt: skip
        image = image / self.scales[f]
        image[~valid] = self.fill  # nodata becomes the band mean, i.e. zero after normalisation
        t = self._dataset(f).transform
        (x0, y0), (x1, y1) = (
            t @ (win.col_off, win.row_off),
            t @ (win.col_off + win.width, win.row_off + win.height),
        )
        return {
            "image": image,
            "mask": valid,
            "path": self.infos[f].path,
            "window": (int(win.col_off), int(win.row_off), int(win.width), int(win.height)),
            "bounds": (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)),  # left, bottom, right, top
        }

    def _note_broken(self, f: int, error: Exception) -> None:
        """Name a failing file once (per process)."""
        path = self.infos[f].path
        if isinstance(error, UnreadableRasterError):
            self._unopenable.add(f)
        if path not in self.broken:
            self.broken.add(path)
            log.warning(
                "skipping unreadable windows of %s (%d file(s) so far; another window is drawn): %s",
                path, len(self.broken), read_error_text(error),
            )  # fmt: skip
