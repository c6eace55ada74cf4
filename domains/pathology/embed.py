"""``foundation embed --domain pathology``: one HDF5 of tile features per slide (the CLAM/TRIDENT layout).

Each slide's tissue tiles are planned in the main process, read by DataLoader workers (each opens the slide
itself) and run through the frozen backbone in batches. ``FEATS_DIR/<slide>.h5`` holds ``coords`` (N x 2
int64, level-0 top-left corners) and ``features`` (N x D float32) with the tiling and backbone as attributes.
It is written as ``<slide>.h5.partial`` and renamed once complete, so a file under its final name is always
whole: a rerun skips complete files made with the same backbone and settings, and redoes partial ones.

A broken slide (unreadable, no resolution, no tissue, a read error part-way) is skipped with its reason; the
others finish. ``summary.json`` lists processed, skipped and already-complete slides (under torchrun, where slide ``i`` goes
to rank ``i % world_size``, each rank writes ``summary_rank{r}.json`` and rank 0 merges them into it); if any was skipped a
:class:`DataError` follows the summary, so the command exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from domains.pathology.slide import SlideCache, open_slide
from domains.pathology.source import PathologyOptions, list_slides, mpp_override, read_mpp_csv
from domains.pathology.tissue import Tiling, mask_for_tiles, plan_tiles, read_tile
from foundation.config import load_config
from foundation.errors import ConfigError, DataError
from foundation.eval.features import POOLINGS, _pool
from foundation.train.distributed import barrier, destroy_distributed, init_distributed

log = logging.getLogger(__name__)


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


def output_names(slides: tuple[Path, ...], root: Path) -> list[str]:
    """``<stem>.h5`` per slide (a DICOM folder keeps its whole name: UIDs are full of dots). Stems that repeat
    get their folders joined by ``__`` (``x__s.h5``); names that still repeat (``a.svs`` next to ``a.tif``) keep
    their suffix too (``x__a.svs.h5``)."""

    def relative(path: Path, keep_suffix: bool) -> str:
        rel = path.relative_to(root)
        last = rel.name if keep_suffix or path.is_dir() else rel.stem
        return "__".join((*rel.parent.parts, last))

    names = [p.name if p.is_dir() else p.stem for p in slides]
    if root.is_dir():
        for keep_suffix in (False, True):
            names = [
                relative(p, keep_suffix) if names.count(n) > 1 else n
                for p, n in zip(slides, names, strict=True)
            ]
    return [f"{n}.h5" for n in names]


def _options(overrides: list[str], img_size: int) -> PathologyOptions:
    wrong = [o for o in overrides if not o.startswith("data.options.")]
    if wrong:
        raise ConfigError(f"embed takes only data.options.* overrides for the pathology domain, got {wrong}")
    cfg = load_config(None, overrides, domain="pathology")
    options = PathologyOptions.from_config(cfg)
    if "tile_size" not in (cfg.data.options or {}):
        options = dataclasses.replace(options, tile_size=img_size)
    return options


def _is_complete(path: Path, expected: dict[str, Any]) -> bool:
    """A finished output made with the same backbone and settings."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete"):
                return False
            return all(f.attrs.get(k) == v for k, v in expected.items())
    except OSError:  # damaged: redo it
        return False


def _reason(e: BaseException) -> str:
    """The error's message without the worker traceback a DataLoader wraps around it."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("foundation.errors.", "DataError")) else last
    return text


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class StartedSlide:
    """A slide whose tiles are planned and whose reader workers are already running.

    Starting the next slide while the current one is embedded hides its tissue planning, worker start-up and
    first batch behind the model (otherwise a bubble per slide, which dominates archives of small biopsies).
    """

    def __init__(
        self, path: Path, slide_mpp: float | None, options: PathologyOptions, batch_size: int,
        num_workers: int, device: torch.device,
    ) -> None:  # fmt: skip
        o = options
        self.path = path
        with open_slide(path, slide_mpp) as slide:
            self.tiling = plan_tiles(
                slide, mask_for_tiles(slide, o.mpp, o.tile_size), o.mpp, o.tile_size, o.min_tissue
            )
            self.scanned_mpp = float(slide.mpp)
            self.downsample = float(slide.level_downsamples[self.tiling.level])
        if len(self.tiling) == 0:
            raise DataError(
                f"{path}: no {o.tile_size} px tile at {o.mpp} um/px has tissue fraction >= {o.min_tissue} "
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


def _features(
    backbone: torch.nn.Module,
    started: StartedSlide,
    partial: Path,
    mean: torch.Tensor,
    std: torch.Tensor,
    pooling: str,
    device: torch.device,
    progress: bool,
) -> h5py.File:
    """Features of every tile into a new ``partial`` file, returned open (``complete`` still False)."""
    tiling = started.tiling
    n = len(tiling)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    f: h5py.File | None = None
    try:
        desc = started.path.name
        with tqdm(total=n, desc=desc, unit="tile", leave=False, disable=not progress) as bar:
            for images, index in started.batches:
                x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
                with torch.inference_mode(), autocast:
                    feats = _pool(backbone.forward_dict(x), pooling).float().cpu().numpy()
                if f is None:
                    partial.unlink(missing_ok=True)
                    f = h5py.File(partial, "w")
                    f.create_dataset("coords", data=tiling.coords.astype(np.int64))
                    f.create_dataset(
                        "features",
                        shape=(n, feats.shape[1]),
                        dtype="float32",
                        chunks=(min(n, 256), feats.shape[1]),
                    )
                    f.attrs["complete"] = False
                idx = index.numpy()
                f["features"][int(idx[0]) : int(idx[-1]) + 1] = feats  # batches come in order
                bar.update(len(idx))
    except BaseException:
        if f is not None:
            f.close()
        raise
    assert f is not None
    return f


def embed_slide(
    backbone: torch.nn.Module,
    started: StartedSlide,
    out: Path,
    *,
    attrs: dict[str, Any],
    mean: torch.Tensor,
    std: torch.Tensor,
    pooling: str,
    device: torch.device,
    progress: bool,
) -> int:
    """Write ``out`` for one started slide (through ``out.partial``); returns the number of tiles.

    Raises:
        DataError: a tile that cannot be read, or a reader worker that died.
    """
    path, tiling = started.path, started.tiling
    partial = out.with_name(out.name + ".partial")
    f: h5py.File | None = None
    try:
        try:
            f = _features(backbone, started, partial, mean, std, pooling, device, progress)
        except RuntimeError as e:  # a worker killed by a crash in a decoder: this slide, not the job
            if "DataLoader worker" not in str(e):
                raise
            raise DataError(f"{path}: a tile-reading worker died ({e})") from e
        f.attrs.update(
            {
                **attrs,
                "level": int(tiling.level),
                "downsample": started.downsample,
                "slide_mpp": started.scanned_mpp,
                "read_size": int(tiling.read_size),
                "extent": int(tiling.extent),
                "n_tiles": len(tiling),
                "slide": str(path.resolve()),
                "complete": True,
            }
        )
        f.close()
        f = None
        os.replace(partial, out)
    finally:
        if f is not None:
            f.close()
        started.close()
        partial.unlink(missing_ok=True)
    return len(tiling)


def _merge_summaries(out_dir: Path, world_size: int) -> Path:
    """``summary.json`` for the whole archive from the per-rank summaries of a torchrun job."""
    parts = [json.loads((out_dir / f"summary_rank{r}.json").read_text()) for r in range(world_size)]
    lists = ("slides_processed", "slides_skipped", "slides_complete_before")
    merged: dict[str, Any] = {key: [item for part in parts for item in part[key]] for key in lists}
    merged.update(
        out=str(out_dir),
        processed=len(merged["slides_processed"]),
        skipped=len(merged["slides_skipped"]),
        complete_before=len(merged["slides_complete_before"]),
        tiles=sum(p["tiles"] for p in parts),
        world_size=world_size,
    )
    _write_json(out_dir / "summary.json", merged)
    return out_dir / "summary.json"


def embed_slides(backbone: torch.nn.Module, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``foundation embed --domain pathology``: see the module docstring."""
    from domains.pathology.domain import PathologyDomain

    if args.pooling not in POOLINGS:
        raise ConfigError(f"--pooling {args.pooling!r}: choose one of {POOLINGS}")
    img_size = int(args.img_size or meta["backbone_args"]["img_size"])
    options = _options(list(args.overrides or []), img_size)
    out_dir = Path(args.out)
    if not out_dir.parent.exists():
        raise DataError(f"the parent folder of --out {str(out_dir)!r} does not exist")
    root = Path(args.data)
    slides = list_slides(root)
    names = output_names(slides, root)
    table = read_mpp_csv(options.mpp_csv) if options.mpp_csv else {}
    out_dir.mkdir(exist_ok=True)

    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    dist = init_distributed(args.device)
    try:
        device = dist.device
        mine = [i for i in range(len(slides)) if i % dist.world_size == dist.rank]
        mean = torch.tensor(meta.get("mean") or PathologyDomain.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(meta.get("std") or PathologyDomain.std, device=device).view(1, -1, 1, 1)
        backbone = backbone.to(device).train(False)
        attrs = {
            "backbone": str(Path(meta["source"]).resolve()),
            "pooling": args.pooling,
            "tile_size": int(options.tile_size),
            "mpp": float(options.mpp),
            "min_tissue": float(options.min_tissue),
            # the statistics the tiles were normalised with (the backbone's, else the domain's)
            "normalization": json.dumps({"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}),
        }
        processed: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        complete: list[dict[str, str]] = []
        progress = not args.quiet
        todo = []
        for i in mine:
            path, out = slides[i], out_dir / names[i]
            if _is_complete(out, attrs):
                complete.append({"slide": str(path), "out": str(out)})
            else:
                todo.append((path, out))

        def start(k: int) -> StartedSlide | DataError | None:
            if k >= len(todo):
                return None
            path = todo[k][0]
            return _start(
                path, slide_mpp=mpp_override(path, options.slide_mpp, table, root), options=options,
                batch_size=args.batch_size, num_workers=args.num_workers, device=device,
            )  # fmt: skip

        current, upcoming = None, start(0)
        try:
            for k in tqdm(
                range(len(todo)), desc=f"embed (rank {dist.rank})", unit="slide", disable=not progress
            ):
                (path, out), current = todo[k], upcoming
                upcoming = start(k + 1)  # read-ahead: the next slide's workers start while this one runs
                try:
                    if isinstance(current, DataError):
                        raise current
                    n = embed_slide(
                        backbone, current, out, attrs=attrs, mean=mean, std=std, pooling=args.pooling,
                        device=device, progress=progress,
                    )  # fmt: skip
                except DataError as e:
                    log.warning("skipping slide: %s", _reason(e))
                    skipped.append({"slide": str(path), "reason": _reason(e)})
                    continue
                processed.append({"slide": str(path), "out": str(out), "tiles": n})
        finally:  # interrupted: stop the workers still running (closing twice is harmless)
            for started in (current, upcoming):
                if isinstance(started, StartedSlide):
                    started.close()
        name = f"summary_rank{dist.rank}.json" if dist.world_size > 1 else "summary.json"
        summary_path = out_dir / name
        result = {
            "out": str(out_dir),
            "processed": len(processed),
            "skipped": len(skipped),
            "complete_before": len(complete),
            "tiles": sum(p["tiles"] for p in processed),
            "summary": str(summary_path),
        }
        _write_json(
            summary_path,
            {
                **result,
                "rank": dist.rank,
                "world_size": dist.world_size,
                "slides_processed": processed,
                "slides_skipped": skipped,
                "slides_complete_before": complete,
            },
        )
        if dist.world_size > 1:
            barrier()  # every rank's summary is on disk
            if dist.is_main:
                _merge_summaries(out_dir, dist.world_size)
        if skipped:
            raise DataError(
                f"{len(skipped)} of {len(mine)} slides skipped: see {summary_path} "
                f"(first: {skipped[0]['reason']})"
            )
        return result
    finally:
        if not was_initialised:
            destroy_distributed()
