"""``foundation embed --domain pathology``: one HDF5 of tile features per slide (the CLAM/TRIDENT layout).

Each slide's tissue tiles are planned in the main process, read by DataLoader workers (each opens the slide
itself) and run through the frozen backbone in batches. ``FEATS_DIR/<slide>.h5`` holds ``coords`` (N x 2
int64, level-0 top-left corners) and ``features`` (N x D float32) with the tiling and backbone as attributes.
A slide's features are gathered in memory and its file written in one go, re-opened, checked and renamed
(``feature_file.py``), so a file under its final name is always whole.

A file is complete for a rerun when it was made from the same slide (its resolved path, size and mtime) with
the same backbone WEIGHTS (their fingerprint, not the path: a backbone retrained in place is another backbone),
pooling, tiling and normalisation. Another file of ours under that name is replaced only with ``--overwrite``
(without it the slide is skipped, saying so); a file there that is not ours is left alone and its slide skipped.

A broken slide (unreadable, no resolution, no tissue, a read error part-way) is skipped with its reason; the
others finish. A full disk stops the job (no later slide could be written either): the slide being written
leaves nothing behind and the ones not started are listed as skipped. The batch runs on
:mod:`foundation.batch.runner` (slide ``i`` on rank ``i % world_size``, ``--nproc``, the common ``summary.json``
with ``written`` / ``existing`` / ``skipped`` slides, each entry keeping its ``slide`` and ``tiles``). Exit
status (:func:`foundation.batch.exit_status`): 0 every slide done (now or before), 2 some skipped, 1 none done.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from foundation.batch.report import EXISTING, SKIPPED, WRITTEN, BatchReport, ItemResult
from foundation.batch.runner import BatchSpec, Item, Steps, finish, run_items
from foundation.batch.summary import check_summaries
from foundation.config import load_config
from foundation.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from foundation.data.listing import is_url
from foundation.errors import CheckpointError, ConfigError, DataError, OutputError
from foundation.eval.features import POOLINGS, _pool
from foundation.models.fingerprint import weights_fingerprint
from foundation.outputs import pid_running
from foundation.precision import autocast_dtype
from foundation.train.distributed import destroy_distributed, init_distributed
from foundation_domains.pathology.feature_file import is_complete, is_ours, write_feature_file
from foundation_domains.pathology.feature_names import output_names
from foundation_domains.pathology.interop import (
    BAG_FORMATS,
    bag_path,
    coords_attributes,
    ensure_pt_bag,
    write_pt_bag,
)
from foundation_domains.pathology.out_dir import check_out_dir, make_out_dir
from foundation_domains.pathology.regions import qupath_origin, region_digest, region_for
from foundation_domains.pathology.slide import SlideCache, open_slide
from foundation_domains.pathology.slide_refs import SlideRef, slide_name
from foundation_domains.pathology.source import (
    PathologyOptions,
    list_slides,
    mpp_override,
    read_mpp_csv,
)
from foundation_domains.pathology.tissue import OTSU, Tiling, read_tile, tile_slide

log = logging.getLogger(__name__)
COMMAND = "embed"
# what a feature file without these attributes (written before they existed) was made with
KEY_DEFAULTS = {"tissue_threshold": OTSU, "otsu_clip": (8, 30), "overlap": 0, "region_sha256": ""}


class TileDataset(Dataset):
    """Tiles of one slide as ``(3 x S x S uint8, index)``; every worker process opens its own handle."""

    def __init__(self, path: Path, slide_mpp: float | None, tiling: Tiling) -> None:
        self.path = path
        self.slide_mpp = slide_mpp
        self.tiling = tiling
        self.handles = SlideCache(max_open=1)  # empty again after a fork (see SlideCache)

    def __len__(self) -> int:
        return len(self.tiling)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            tile = read_tile(self.handles.get(self.path, self.slide_mpp), self.tiling, index)
        except DataError:
            raise
        except Exception as e:  # a decoder error from tifffile/OpenSlide: name the slide and tile
            raise DataError(f"{self.path}: cannot read tile {index}: {e}") from e
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1), index

    def close(self) -> None:
        self.handles.discard(self.path)


def _options(overrides: list[str], img_size: int) -> PathologyOptions:
    wrong = [o for o in overrides if not o.startswith("data.options.")]
    if wrong:
        raise ConfigError(f"embed takes only data.options.* overrides for the pathology domain, got {wrong}")
    cfg = load_config(None, overrides, domain="pathology")
    options: PathologyOptions = cfg.data.typed_options  # typed when the config loaded
    if "tile_size" not in (cfg.data.options or {}):
        options = dataclasses.replace(options, tile_size=img_size)
    return options


def _reason(e: BaseException) -> str:
    """The error's message without the worker traceback a DataLoader wraps around it."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("foundation.errors.", "DataError")) else last
    return text


class StartedSlide:
    """A slide whose tiles are planned and whose reader workers are already running.

    Starting the next slide while the current one is embedded hides its tissue planning, worker start-up and
    first batch behind the model (otherwise a bubble per slide, which dominates archives of small biopsies).
    """

    def __init__(
        self, path: Path, key: dict[str, Any], slide_mpp: float | None, options: PathologyOptions,
        batch_size: int, num_workers: int, device: torch.device, name: str | None = None,
    ) -> None:  # fmt: skip
        o = options
        self.path = path
        # this slide's part of its key (identity, resolution override), taken before any tile is read: a slide
        # rewritten meanwhile does not look complete
        self.key = key
        region = region_for(path, o.regions, name)
        with open_slide(path, slide_mpp) as slide:
            _, self.tiling = tile_slide(slide, o.mpp, o.tile_size, o.rules, region)
            self.scanned_mpp = float(slide.mpp)
            self.level0_size = tuple(int(v) for v in slide.dimensions)
            self.qupath_origin = qupath_origin(slide.properties, self.level0_size)
            self.mpp_source = slide.mpp_source
            self.downsample = float(slide.level_downsamples[self.tiling.level])
        if len(self.tiling) == 0:
            inside = f" inside {region.path}" if region is not None else ""
            raise DataError(
                f"{path}: no {o.tile_size} px tile at {o.mpp} um/px has tissue fraction >= {o.min_tissue}{inside} "
                "(look at it with `foundation pathology-qc`)"
            )
        self.dataset = TileDataset(path, slide_mpp, self.tiling)
        loader = DataLoader(
            self.dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
        )
        self.batches = iter(loader)  # the workers start reading now

    def close(self) -> None:
        """Stop the workers (and their slide handles) now, not when a traceback holding them is collected."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.dataset.close()


def _start(path: Path, **kwargs: Any) -> StartedSlide | DataError:
    """A started slide, or the error that makes it skipped (reported when its turn comes)."""
    try:
        return StartedSlide(path, **kwargs)
    except DataError as e:
        return e


def check_backbone(meta: dict[str, Any]) -> None:
    """Slides are 2D RGB: a volume backbone, or one for other channels, is refused by name before any work.

    Raises:
        CheckpointError: the backbone is 3D or does not take 3 input channels.
    """
    args = meta["backbone_args"]
    dims, chans = int(args.get("spatial_dims", 2)), int(args.get("in_chans", 3))
    problems = [f"it is a {dims}D (volume) backbone"] if dims != 2 else []
    problems += [f"it takes {chans} input channel(s), slides are RGB (3)"] if chans != 3 else []
    if problems:
        raise CheckpointError(
            f"--backbone {meta['source']}: cannot embed slides: {' and '.join(problems)}; "
            "give a 2D backbone pretrained on RGB tiles (e.g. from `foundation pretrain --domain pathology`)"
        )


def _is_old_partial(file: Path) -> bool:
    """An unfinished feature file of an earlier version of this command (HDF5, ``coords``, ``complete`` False)."""
    try:
        with h5py.File(file, "r") as f:
            return "coords" in f and "complete" in f.attrs and not bool(f.attrs["complete"])
    except OSError:
        return False


def _left_by_a_killed_run(file: Path, names: set[str]) -> bool:
    """``.tmp-<pid>-<name>`` of a process that is gone, or ``<name>.partial`` (an earlier version's)."""
    if file.name.endswith(".partial"):  # a visible name: removed only when it is an earlier version's file
        return file.name.removesuffix(".partial") in names and _is_old_partial(file)
    pid, _, name = file.name.removeprefix(".tmp-").partition("-")
    return file.name.startswith(".tmp-") and pid.isdigit() and name in names and not pid_running(int(pid))


def remove_stale_temporaries(out_dir: Path, names: set[str]) -> None:
    """Remove the temporaries of our outputs ``names`` that a killed earlier run left behind."""
    for file in out_dir.iterdir():
        if file.is_file() and _left_by_a_killed_run(file, names):
            log.info("removing %s, left by an interrupted run", file)
            file.unlink(missing_ok=True)


def slide_identity(path: Path) -> dict[str, Any]:
    """Which slide a feature file was made from: its resolved path, size and mtime (a DICOM folder: the total
    size and latest mtime of its files), so another slide under the same name, or one rewritten, is redone.

    A URL's identity is the URL and its size (:func:`foundation_domains.pathology.remote.remote_identity`).

    Raises:
        DataError: the slide cannot be looked at (gone, no permission, unreachable).
    """
    if is_url(path):
        from foundation_domains.pathology.remote import remote_identity

        return remote_identity(str(path))
    resolved = path.resolve()
    try:
        files = [p for p in resolved.iterdir() if p.is_file()] if resolved.is_dir() else [resolved]
        stats = [f.stat() for f in files]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    return {
        "slide": str(resolved),
        "slide_bytes": sum(s.st_size for s in stats),
        "slide_mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def feature_key(
    fingerprint: str, meta: dict[str, Any], options: PathologyOptions, pooling: str
) -> dict[str, Any]:
    """What determines a slide's features, stored with them: a rerun redoes a file whose key differs. The
    backbone is known by ``fingerprint``, its weights' (not its path: a retrained backbone at the same path is
    another one)."""
    return {
        "backbone_fingerprint": fingerprint,
        "pooling": pooling,
        "tile_size": int(options.tile_size),
        "mpp": float(options.mpp),
        "min_tissue": float(options.min_tissue),
        "tissue_threshold": _threshold_text(options.tissue_threshold),
        "otsu_clip": np.asarray(options.otsu_clip, np.int64),
        "overlap": int(options.overlap),
        "mean": np.asarray(meta.get("mean") or IMAGENET_MEAN, np.float64),
        "std": np.asarray(meta.get("std") or IMAGENET_STD, np.float64),
    }


def _threshold_text(threshold: str | float) -> str:
    """``otsu`` or the fixed value written one way (20 and 20.0 are the same setting)."""
    return threshold if threshold == OTSU else f"{float(threshold):g}"


def fingerprint_in_background(backbone: torch.nn.Module) -> Future[str]:
    """The backbone's weights fingerprint, hashed in a thread (hashlib releases the GIL) while the first slide's
    tissue is planned and its first batch read: hashing ViT-B's 344 MB takes about 0.3 s on one core, ViT-g's
    4.5 GB several seconds, and is only needed to compare with existing files and to write the first one.

    The state dict is taken here, before the backbone moves to its device: the thread hashes exactly these
    (frozen) weights.
    """
    state = backbone.state_dict()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-fingerprint")
    try:
        return executor.submit(weights_fingerprint, state)
    finally:
        executor.shutdown(wait=False)  # the thread ends when the hash is done


class SlideEmbedder:
    """Embeds started slides with a frozen backbone and writes one feature file each."""

    def __init__(
        self, backbone: torch.nn.Module, fingerprint: Future[str] | str, args: argparse.Namespace,
        options: PathologyOptions, mpp_table: dict[str, float], device: torch.device, source: str,
        meta: dict[str, Any],
    ) -> None:  # fmt: skip
        self.backbone = backbone.to(device).train(False)
        self.fingerprint = fingerprint
        # the key without the fingerprint is known now (mean/std for normalising); the whole key is asked for
        # only where a file is compared or written (:attr:`key`)
        self.settings = feature_key("", meta, options, args.pooling)
        self.options = options
        self.device = device
        self.source = source
        self.pooling = args.pooling
        self.bags = getattr(args, "bags", None)  # also write FEATS/pt_files/<slide>.pt (CLAM's bags)
        self.batch_size, self.num_workers = args.batch_size, args.num_workers
        self.progress = not args.quiet
        self.root = Path(args.data)
        self.table = mpp_table
        mean, std = self.settings["mean"], self.settings["std"]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @property
    def key(self) -> dict[str, Any]:
        """What every slide's key shares (:func:`feature_key`); waits for the weights' fingerprint."""
        fingerprint = self.fingerprint if isinstance(self.fingerprint, str) else self.fingerprint.result()
        return {**self.settings, "backbone_fingerprint": fingerprint}

    def slide_mpp(self, path: Path) -> float | None:
        return mpp_override(path, self.options.slide_mpp, self.table, self.root)

    def slide_key(self, path: Path, name: str | None = None) -> dict[str, Any]:
        """One slide's own part of its key: which slide it is, and a resolution given by the user, which changes
        its tiles (0: the file's own), and its region (``name``: its output's stem, which names its region file).

        Raises:
            DataError: the slide cannot be looked at.
        """
        override = float(self.slide_mpp(path) or 0.0)
        region = region_digest(region_for(path, self.options.regions, name))
        return {**slide_identity(path), "slide_mpp_override": override, "region_sha256": region}

    def start(self, path: Path, name: str | None = None) -> StartedSlide | DataError:
        try:
            key = self.slide_key(path, name)
        except DataError as e:
            return e
        return _start(
            path, key=key, slide_mpp=self.slide_mpp(path), options=self.options, batch_size=self.batch_size,
            num_workers=self.num_workers, device=self.device, name=name,
        )  # fmt: skip

    def features(self, started: StartedSlide) -> np.ndarray:
        """``N x D`` float32 features of every tile of ``started`` (in memory: the file is written in one go).

        Raises:
            DataError: a tile that cannot be read, or a reader worker that died.
        """
        n = len(started.tiling)
        amp = autocast_dtype("auto", self.device)
        autocast = torch.autocast(self.device.type, dtype=amp, enabled=amp is not None)
        out: np.ndarray | None = None
        bar = tqdm(
            total=n, desc=slide_name(started.path), unit="tile", leave=False, disable=not self.progress
        )
        try:
            with bar:
                for images, index in started.batches:
                    x = images.to(self.device, non_blocking=True).float().div_(255)
                    x = x.sub_(self.mean).div_(self.std)
                    with torch.inference_mode(), autocast:
                        feats = _pool(self.backbone.forward_dict(x), self.pooling).float().cpu().numpy()
                    if out is None:
                        out = np.empty((n, feats.shape[1]), np.float32)
                    idx = index.numpy()
                    out[int(idx[0]) : int(idx[-1]) + 1] = feats  # batches come in order
                    bar.update(len(idx))
        except RuntimeError as e:  # a worker killed by a crash in a decoder: this slide, not the job
            if "DataLoader worker" not in str(e):
                raise
            raise DataError(f"{started.path}: a tile-reading worker died ({e})") from e
        assert out is not None  # a started slide has at least one tile
        return out

    def embed(self, started: StartedSlide, out: Path) -> int:
        """Write ``out`` for one started slide; returns the number of tiles.

        Raises:
            DataError: the slide cannot be read (see :meth:`features`).
            OutputError: ``out`` cannot be written (no space left, ...); nothing is left under its name.
        """
        try:
            features = self.features(started)
        finally:
            started.close()
        tiling = started.tiling
        attrs = {
            **self.key,
            **started.key,
            "backbone": self.source,
            "level": int(tiling.level),
            "downsample": started.downsample,
            "slide_mpp": started.scanned_mpp,
            "mpp_source": started.mpp_source,
            "read_size": int(tiling.read_size),
            "extent": int(tiling.extent),
            "qupath_origin": np.asarray(started.qupath_origin, np.int64),  # QuPath's (0, 0): MIRAX bounds
            "n_tiles": len(tiling),
            "complete": True,
        }
        coords_attrs = coords_attributes(
            name=out.stem, tiling=tiling, slide_mpp=started.scanned_mpp, level0_size=started.level0_size,
            root_attrs=attrs,
        )  # fmt: skip
        write_feature_file(out, tiling.coords, features, attrs, coords_attrs)
        if self.bags == "pt":
            write_pt_bag(bag_path(out, "pt"), features)
        return len(tiling)


def existing_output(
    embedder: SlideEmbedder, item: Item[SlideRef], *, overwrite: bool
) -> dict[str, Any] | None:
    """The batch runner's ``existing`` step: ``{}`` when ``item.out`` is complete with this key (done, not
    redone), None when it must be made (absent, or one of ours made otherwise and ``overwrite``).

    Raises:
        DataError: the slide cannot be looked at, or a feature file of ours made with other weights, settings or
            slide is there and ``overwrite`` is off (left as it is, the slide skipped).
        OutputError: a file there that is not ours (never replaced), or a complete slide's missing bag cannot
            be written.
    """
    out = item.out
    assert out is not None
    if not out.exists():  # nothing to compare with: the slide is looked at when it starts
        return None
    slide_key = embedder.slide_key(item.source, out.stem)
    if is_complete(out, {**embedder.key, **slide_key}, KEY_DEFAULTS):
        if embedder.bags == "pt":
            _bag_of_complete(out)
        return {}
    if not is_ours(out):
        raise OutputError(
            f"{out} exists and is not a feature file of ours; it was left as it is (move it or give another --out)"
        )
    if not overwrite:
        raise DataError(f"{out} was made with other weights, settings or slide; pass --overwrite")
    return None


def _bag_of_complete(out: Path) -> None:
    """A complete slide's ``pt`` bag, written from its feature file when missing or different.

    Raises:
        DataError: the bag cannot be written (the slide is skipped; a full disk here does not stop the batch).
    """
    try:
        if ensure_pt_bag(out):
            log.info("%s: written from %s", bag_path(out, "pt"), out)
    except (OSError, OutputError) as e:
        raise DataError(f"{bag_path(out, 'pt')}: cannot write the bag ({e})") from e


def _started(embedder: SlideEmbedder, item: Item[SlideRef]) -> StartedSlide:
    """The runner's read-ahead step: the slide's tiles planned and its reader workers running."""
    assert item.out is not None
    started = embedder.start(item.source, item.out.stem)
    if isinstance(started, DataError):
        raise started
    return started


def _legacy_summary(data: dict[str, Any]) -> bool:
    """A ``summary*.json`` written by embed before the common batch summary."""
    return "slides_processed" in data


def embed_slides(backbone: torch.nn.Module, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``foundation embed --domain pathology``: see the module docstring.

    Returns:
        The result printed by the command, ``exit_status`` included (0 all done, 2 some skipped), and
        ``error`` when the command ends with one after printing it (nothing done, or no summary written).

    Raises:
        CheckpointError, ConfigError, OutputError, DataError: refused before anything is written.
    """
    check_backbone(meta)
    if args.pooling not in POOLINGS:
        raise ConfigError(f"--pooling {args.pooling!r}: choose one of {POOLINGS}")
    if getattr(args, "bags", None) not in (None, *BAG_FORMATS):
        raise ConfigError(f"--bags {args.bags!r}: choose one of {BAG_FORMATS}")
    img_size = int(args.img_size or meta["backbone_args"]["img_size"])
    overrides = list(args.overrides or [])
    options = _options(overrides, img_size)
    if getattr(args, "slides_csv", None):  # a path as typed: an override's value would be read as YAML
        if any(o.startswith("data.options.slides_csv=") for o in overrides):
            raise ConfigError("--slides-csv and data.options.slides_csv both given: keep one")
        options = dataclasses.replace(options, slides_csv=str(args.slides_csv))
    out_dir, root = Path(args.out), Path(args.data)
    slides = list_slides(args.data)  # not root: Path() would fold a URL's "https://" to "https:/"
    check_out_dir(out_dir, [root], summary_key=None)
    check_summaries(out_dir, COMMAND, _legacy_summary)
    table = read_mpp_csv(options.mpp_csv) if options.mpp_csv else {}
    names = output_names(slides, root)  # of every slide found: a slide list does not change its file's name
    not_listed: list[dict[str, str]] = []
    if options.slides_csv:
        from foundation_domains.pathology.slide_list import select_slides

        choice = select_slides(options.slides_csv, list(slides), root)
        keep = set(choice.chosen)
        names = [n for s, n in zip(slides, names, strict=True) if s in keep]
        slides, not_listed = choice.chosen, list(choice.missing)
    make_out_dir(out_dir)
    fingerprint = fingerprint_in_background(backbone)

    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    dist = init_distributed(args.device)
    try:
        remove_stale_temporaries(out_dir, set(names[dist.rank :: dist.world_size]))
        source = str(Path(meta["source"]).resolve())
        embedder = SlideEmbedder(backbone, fingerprint, args, options, table, dist.device, source, meta)
        report = BatchReport(ranks=(dist.rank,))
        if dist.is_main:  # names of the slide list that match no slide: reported once, by rank 0
            for entry in not_listed:
                log.warning("skipping %s: %s", entry["slide"], entry["reason"])
                facts = {"slide": entry["slide"]}
                report.results.append(
                    ItemResult(entry["slide"], SKIPPED, reason=entry["reason"], facts=facts)
                )
        overwrite = bool(getattr(args, "overwrite", False))
        spec = BatchSpec(
            COMMAND, "slide", stop_on_disk_full=True, reason=_reason, progress=not args.quiet,
            entry_keys=lambda item: {"slide": item.name},
        )  # fmt: skip
        steps: Steps[SlideRef, StartedSlide] = Steps(
            run=lambda item, started: {"tiles": embedder.embed(started, item.out)},
            existing=lambda item: existing_output(embedder, item, overwrite=overwrite),
            start=lambda item: _started(embedder, item),
            close=StartedSlide.close,
        )
        # streamed: a list file of 100,000 slides is never held as a list of items
        items = (Item(i, str(s), s, out_dir / n) for i, (s, n) in enumerate(zip(slides, names, strict=True)))
        share = len(range(dist.rank, len(slides), dist.world_size))
        run_items(items, steps, spec, rank=dist.rank, world_size=dist.world_size, report=report, total=share)
        outcome = finish(
            report, spec, rank=dist.rank, world_size=dist.world_size, summary_dir=out_dir, out=str(out_dir),
            facts=lambda r: {"tiles": sum(x.facts.get("tiles", 0) for x in r.of(WRITTEN))},
        )  # fmt: skip
    finally:
        if not was_initialised:
            destroy_distributed()
    merged = outcome.report
    result: dict[str, Any] = {
        "out": str(out_dir),
        "processed": len(merged.of(WRITTEN)),
        "skipped": len(merged.skipped),
        "complete_before": len(merged.of(EXISTING)),
        "tiles": sum(x.facts.get("tiles", 0) for x in merged.of(WRITTEN)),
        "exit_status": outcome.status,
        "summary": str(outcome.summary) if outcome.summary is not None else None,
    }
    if outcome.error is not None:
        result["error"] = outcome.error
    return result
