"""Training samples from a folder of slides: a random slide, then a random tissue tile of it.

Only slide FILES are listed. A slide's tissue mask and tile grid are computed when a worker first draws
it and kept in a bounded per-worker cache, so no tile list of a whole archive is ever held in memory.
Consecutive stream indices (``samples_per_slide`` of them) share a slide, so the micro-batch a worker reads
reuses one open handle and one mask instead of opening a new slide for every tile.
"""

from __future__ import annotations

import csv
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundation.config import Config, reject_unknown_keys
from foundation.data.listing import is_list_file, is_url, read_list
from foundation.data.seeding import generator_for
from foundation.errors import ConfigError, DataError
from foundation_domains.pathology.regions import region_for
from foundation_domains.pathology.slide import SlideCache
from foundation_domains.pathology.slide_refs import SLIDE_SUFFIXES, SlideList, SlideRef, slide_name
from foundation_domains.pathology.tissue import OTSU, TileRules, Tiling, read_tile, tile_slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathologyOptions:
    """``data.options`` of the pathology domain (unknown keys are refused by name).

    Attributes:
        mpp: target microns per pixel of a tile (0.5 ~ 20x).
        mpps: multi-magnification sampling: each pretraining sample draws one of these resolutions (e.g.
            ``[0.25, 0.5, 1.0, 2.0]``, 40x to 5x) instead of ``mpp``; every tile keeps ``tile_size`` pixels, so
            coarser tiles cover more tissue. ``embed`` always uses ``mpp``.
        tile_size: tile side in pixels; default ``data.crops.global_size``.
        min_tissue: smallest tissue fraction of a tile that is sampled.
        tissue_threshold: ``otsu`` (Otsu's threshold of the saturation, clipped to ``otsu_clip``) or a fixed
            saturation value 0-255 above which a mask pixel is tissue.
        otsu_clip: ``[low, high]`` bounds of Otsu's threshold (default ``[8, 30]``).
        overlap: pixels at the target resolution that neighbouring tiles share (grid step
            ``tile_size - overlap``, as TRIDENT and CLAM); 0 to ``tile_size - 1``.
        regions: a folder of GeoJSON regions, ``<slide stem>.geojson`` (QuPath's annotation export, level-0
            pixels): only tiles whose centre lies inside are kept; a slide without one is skipped.
        slides_csv: a CSV naming the slides to use (column ``slide_id``, ``slide`` or ``path``; CLAM's
            ``process_list``); names that match no slide are reported.
        slide_mpp: the resolution of every slide, overriding the files (for slides without one).
        mpp_csv: a CSV with columns ``slide,mpp`` (file name, relative or absolute path) per slide.
        samples_per_slide: consecutive stream indices drawn from one slide.
        max_open_slides: open slide handles per worker.
        hed_scale, hed_shift: HED stain jitter ranges (see ``stain.HEDJitter``).
    """

    mpp: float = 0.5
    mpps: tuple[float, ...] | None = None
    tile_size: int = 224
    min_tissue: float = 0.25
    tissue_threshold: str | float = OTSU
    otsu_clip: tuple[int, int] = (8, 30)
    overlap: int = 0
    regions: str | None = None
    slides_csv: str | None = None
    slide_mpp: float | None = None
    mpp_csv: str | None = None
    samples_per_slide: int = 8
    max_open_slides: int = 8
    hed_scale: float = 0.05
    hed_shift: float = 0.05

    def __post_init__(self) -> None:
        checks = {
            "mpp": self.mpp > 0,
            "mpps": self.mpps is None or (len(self.mpps) > 0 and all(m > 0 for m in self.mpps)),
            "tile_size": isinstance(self.tile_size, int) and self.tile_size >= 8,
            "min_tissue": 0 <= self.min_tissue <= 1,
            "tissue_threshold": self.tissue_threshold == OTSU
            or (not isinstance(self.tissue_threshold, (str, bool)) and 0 <= self.tissue_threshold <= 255),
            "otsu_clip": len(self.otsu_clip) == 2 and 0 <= self.otsu_clip[0] <= self.otsu_clip[1] <= 255,
            "overlap": isinstance(self.overlap, int)
            and not isinstance(self.overlap, bool)
            and 0 <= self.overlap < self.tile_size,
            "regions": self.regions is None or isinstance(self.regions, str),  # a folder's path
            "slides_csv": self.slides_csv is None or isinstance(self.slides_csv, str),
            "slide_mpp": self.slide_mpp is None or self.slide_mpp > 0,
            "samples_per_slide": isinstance(self.samples_per_slide, int) and self.samples_per_slide >= 1,
            "max_open_slides": isinstance(self.max_open_slides, int) and self.max_open_slides >= 1,
            "hed_scale": 0 <= self.hed_scale < 1,
            "hed_shift": self.hed_shift >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"data.options.{key}={getattr(self, key)!r} is out of range")

    @property
    def rules(self) -> TileRules:
        """How tissue is found and tiles kept (one rule for pretraining, ``embed`` and ``pathology-qc``)."""
        threshold = None if self.tissue_threshold == OTSU else float(self.tissue_threshold)
        return TileRules(self.min_tissue, threshold, self.otsu_clip, self.overlap)

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Config | None = None) -> PathologyOptions:
        """``data.options`` as written (typed once, when the config loads: ``cfg.data.typed_options``);
        ``tile_size`` defaults to ``cfg``'s global crop size.

        Raises:
            ConfigError: unknown key, wrong type or value out of range; the message names the key.
        """
        options = dict(options or {})
        reject_unknown_keys(options, cls, "data.options", "the pathology domain")
        if cfg is not None:
            options.setdefault("tile_size", cfg.data.crops.global_size)
        for key in ("mpp", "min_tissue", "slide_mpp", "hed_scale", "hed_shift"):
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"data.options.{key}={value!r} must be a number")
        mpps = options.get("mpps")
        if mpps is not None:
            if isinstance(mpps, (int, float)):
                mpps = [mpps]
            if not isinstance(mpps, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) for m in mpps
            ):
                raise ConfigError(f"data.options.mpps={mpps!r} must be a list of numbers (um/px)")
            options["mpps"] = tuple(float(m) for m in mpps)
        threshold = options.get("tissue_threshold", OTSU)
        if isinstance(threshold, bool) or not (threshold == OTSU or isinstance(threshold, (int, float))):
            raise ConfigError(
                f"data.options.tissue_threshold={threshold!r} must be {OTSU!r} or a saturation value 0-255"
            )
        clip = options.get("otsu_clip")
        if clip is not None:
            if (
                not isinstance(clip, (list, tuple))
                or len(clip) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in clip)
            ):
                raise ConfigError(f"data.options.otsu_clip={clip!r} must be [low, high], integers 0-255")
            options["otsu_clip"] = (int(clip[0]), int(clip[1]))
        return cls(**options)


def list_slides(path: str | Path) -> Sequence[SlideRef]:
    """Slides under ``path`` (recursive, sorted), ``path`` itself when it is a slide file or a URL, or the
    entries of a list file (``.txt``/``.csv``, read on demand: :class:`~foundation_domains.pathology.slide_refs.SlideList`).

    A DICOM slide is a folder of ``.dcm`` instances (one per level, plus label and overview), so the FOLDER
    is the slide: one entry, named after the folder in outputs (:func:`foundation_domains.pathology.slide.open_slide`
    opens it). Every other slide is a file. A URL is a string (``https://``, ``s3://``), read by
    :mod:`foundation_domains.pathology.remote`; entries of a list file are checked when they are read, not here.

    Raises:
        DataError: the path does not exist or holds no slide; a list file names none.
    """
    if is_url(path):
        return (str(path),)
    root = Path(path)
    if not root.exists():
        raise DataError(f"slide path {str(root)!r} does not exist")
    if is_list_file(root):
        return SlideList(read_list(root))
    if root.is_file():
        return (root,)
    files = (
        p
        for p in root.rglob("*")
        if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    slides = sorted({p.parent if p.suffix.lower() == ".dcm" else p for p in files})
    if not slides:
        raise DataError(f"data folder {str(root)!r} has no slides ({', '.join(SLIDE_SUFFIXES)})")
    return tuple(slides)


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """``slide -> mpp`` from a CSV with a ``slide,mpp`` header.

    Raises:
        DataError: missing file, missing columns or a value that is not a positive number (row named).
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"slide", "mpp"} <= set(reader.fieldnames):
                raise DataError(
                    f"{path}: an mpp CSV needs the columns 'slide' and 'mpp', got {reader.fieldnames}"
                )
            table = {}
            for line, row in enumerate(reader, start=2):
                try:
                    mpp = float(row["mpp"])
                except (TypeError, ValueError):
                    mpp = -1.0
                if not mpp > 0:
                    raise DataError(f"{path}:{line}: mpp {row['mpp']!r} is not a positive number")
                table[row["slide"].strip()] = mpp
            return table
    except OSError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"mpp CSV {str(path)!r} cannot be read: {e}") from e


def mpp_override(
    path: Path, slide_mpp: float | None, table: dict[str, float], root: Path | None = None
) -> float | None:
    """The user's resolution for ``path``: ``slide_mpp`` for every slide, else the CSV row naming it (by
    absolute path, path relative to ``root``, file name or stem), else None (the file's own)."""
    if slide_mpp is not None:
        return slide_mpp
    name = slide_name(path)
    keys = [str(path), name, Path(name).stem]
    if root is not None and not is_url(path) and root.is_dir():
        keys.insert(1, str(path.relative_to(root)))
    return next((table[k] for k in keys if k in table), None)


class SlideSampleSource:
    """An endless stream of tissue tiles (``{"image": H x W x 3 uint8, "path", "coords"}``).

    The slide of index ``i`` depends on ``(seed, i // samples_per_slide)`` and the tile on the sample's
    generator, so the stream is the same on any number of ranks and workers. A slide that cannot be read,
    has no resolution or no tissue is named in the log once and its turn goes to another draw.
    """

    def __init__(
        self,
        slides: tuple[Path, ...],
        options: PathologyOptions,
        seed: int,
        root: Path | None = None,
        mpp_table: dict[str, float] | None = None,
        max_tilings: int = 256,
        names: dict[SlideRef, str] | None = None,
    ) -> None:
        self.slides = slides
        self.options = options
        self.seed = seed
        self.root = root
        self.mpp_table = mpp_table or {}
        self.max_tilings = max_tilings
        self.handles = SlideCache(options.max_open_slides)
        self._tilings: OrderedDict[tuple[Path, float], Tiling] = OrderedDict()
        self.broken: set[Path] = set()
        self._last_slide: tuple[tuple[int, int] | None, Path | None] = (None, None)
        self._overrides: dict[Path, float | None] = {}
        self._names = names  # each slide's name as embed gives it (region files); None: of these slides

    def region_name(self, path: Path) -> str | None:
        """The slide's name as ``embed`` gives it among the slides of the folder (``x__s`` when ``s`` repeats),
        which names its region file."""
        if self.options.regions is None or self.root is None:
            return None
        if self._names is None:  # once per worker, on first use
            from foundation_domains.pathology.feature_names import output_names

            names = output_names(self.slides, self.root)
            self._names = {s: n.removesuffix(".h5") for s, n in zip(self.slides, names, strict=True)}
        return self._names.get(path)

    def mpp_override(self, path: Path) -> float | None:
        if path not in self._overrides:  # once per slide: the lookup stats the root folder
            self._overrides[path] = mpp_override(path, self.options.slide_mpp, self.mpp_table, self.root)
        return self._overrides[path]

    def tiling(self, path: Path, mpp: float | None = None) -> Tiling:
        """The slide's tissue tiles at ``mpp`` (default ``options.mpp``), computed on first use and cached
        (bounded) in this worker.

        Raises:
            DataError: unreadable slide, no resolution, or no tile with enough tissue.
        """
        o = self.options
        mpp = o.mpp if mpp is None else mpp
        key = (path, mpp)
        if (cached := self._tilings.get(key)) is not None:
            self._tilings.move_to_end(key)
            return cached
        slide = self.handles.get(path, self.mpp_override(path))
        region = region_for(path, o.regions, self.region_name(path))
        _, tiling = tile_slide(slide, mpp, o.tile_size, o.rules, region)
        if not len(tiling):
            inside = f" inside {region.path}" if region is not None else ""
            raise DataError(
                f"{path}: no {o.tile_size} px tile at {mpp} um/px has tissue fraction >= {o.min_tissue}{inside} "
                "(look at it with `foundation pathology-qc`)"
            )
        if slide.mpp > mpp * 1.01:
            log.warning(
                "%s: scanned at %.3g um/px, coarser than the target %g: tiles are upsampled",
                path,
                slide.mpp,
                mpp,
            )
        self._tilings[key] = tiling
        while len(self._tilings) > self.max_tilings:
            self._tilings.popitem(last=False)
        return tiling

    def slide_at(self, index: int, attempt: int = 0) -> Path:
        key = (index // self.options.samples_per_slide, attempt)
        if self._last_slide[0] != key:  # consecutive indices share a slide: draw it once per group
            g = generator_for(self.seed, key[0], attempt, 0x511DE)
            self._last_slide = (key, self.slides[int(torch.randint(len(self.slides), (1,), generator=g))])
        return self._last_slide[1]

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        for attempt in range(8 * len(self.slides) + 32):
            if len(self.broken) == len(self.slides):
                break
            path = self.slide_at(index, attempt)
            if path in self.broken:
                continue
            try:
                mpp = self.options.mpp
                if self.options.mpps:  # multi-magnification: one resolution per sample
                    mpps = self.options.mpps
                    mpp = mpps[int(torch.randint(len(mpps), (1,), generator=generator))]
                tiling = self.tiling(path, mpp)
                i = int(torch.randint(len(tiling), (1,), generator=generator))
                tile = read_tile(self.handles.get(path, self.mpp_override(path)), tiling, i)
                return {"image": tile, "path": str(path), "coords": tiling.coords[i].copy(), "mpp": mpp}
            except DataError as e:
                self.handles.discard(path)  # an OpenSlide handle is unusable after an error
                self.broken.add(path)
                log.warning("skipping slide (%d of %d so far): %s", len(self.broken), len(self.slides), e)
        where = self.root or (self.slides[0].parent if self.slides else "?")
        raise DataError(
            f"no slide under {str(where)!r} gave a tissue tile ({len(self.broken)} skipped; see the log)"
        )
