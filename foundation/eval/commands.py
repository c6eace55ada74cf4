"""``foundation evaluate knn|linear``: frozen features of a backbone (or its random-init twin) on labelled data."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from foundation.batch.embedder import BatchEmbedder
from foundation.config import load_config
from foundation.data.spec import DataSpec
from foundation.domain import get_domain
from foundation.errors import ConfigError, DataError
from foundation.eval.embed import embed_dataset
from foundation.eval.features import cached_features, extract_features, feature_cache_key, remap_labels
from foundation.eval.knn import knn_evaluate
from foundation.eval.linear import linear_probe
from foundation.eval.low_shot import low_shot
from foundation.export import load_backbone, random_like, resolve_backbone_source
from foundation.models.fingerprint import weights_fingerprint
from foundation.precision import autocast_dtype
from foundation.train.distributed import resolve_device

log = logging.getLogger(__name__)


def _eval_config(meta: dict[str, Any], size: int, domain: str):
    """A config whose model and crop sizes match the backbone, for the domain's evaluation datasets."""
    patch = meta["backbone_args"]["patch_size"]
    overrides = [
        f"data.crops.global_size={size}",
        f"data.crops.local_size={patch}",
        f"model.patch_size={patch}",
        f"model.img_size={meta['backbone_args']['img_size']}",
        f"model.spatial_dims={meta['backbone_args'].get('spatial_dims', 2)}",
    ]
    return load_config(None, overrides, domain=domain)


def backbone_spec(meta: dict[str, Any]) -> DataSpec | None:
    """The data a backbone takes, with the statistics it was trained with; None when it records none."""
    args = meta["backbone_args"]
    mean, std = meta.get("mean") or (), meta.get("std") or ()
    if not mean or len(mean) != args["in_chans"] or len(std) != len(mean):
        return None
    return DataSpec(int(args["in_chans"]), int(args.get("spatial_dims", 2)), tuple(mean), tuple(std))


def _eval_dataset(domain_name: str, path: str, meta: dict[str, Any], size: int):
    """The domain's labelled dataset, normalised with the backbone's own statistics, checked for channels."""
    domain = get_domain(domain_name)
    dataset = domain.eval_dataset(path, _eval_config(meta, size, domain_name), backbone_spec(meta))
    if len(dataset) == 0:
        raise DataError(f"{path}: no labelled items found")
    channels = int(dataset[0]["image"].shape[0])
    if meta["backbone_args"]["in_chans"] != channels:
        raise DataError(
            f"backbone {meta['source']} takes {meta['backbone_args']['in_chans']} channels, the data in {path} "
            f"has {channels}; pick the backbone trained on this kind of data"
        )
    return dataset


def check_nproc(args: argparse.Namespace) -> None:
    """``embed --nproc N`` shares inputs out by rank: only a domain with per-input outputs can.

    Raises:
        ConfigError: the domain writes one file for the whole folder.
    """
    if not isinstance(get_domain(args.domain), BatchEmbedder):
        raise ConfigError(
            f"--nproc: the {args.domain!r} domain writes one HDF5 for the whole folder; run it in one process"
        )


def embed(args: argparse.Namespace) -> dict[str, Any]:
    """Features of a labelled folder to one HDF5, or the domain's own layout (e.g. one HDF5 per slide) when the
    domain is a :class:`~foundation.batch.embedder.BatchEmbedder`."""
    backbone, meta = load_backbone(args.backbone)
    domain = get_domain(args.domain)
    if isinstance(domain, BatchEmbedder):
        return domain.embed_data(backbone, meta, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        check_nproc(args)
    if args.overrides:
        raise ConfigError(f"the {args.domain!r} domain takes no embed options, got {args.overrides}")
    if getattr(args, "bags", None):
        raise ConfigError(f"--bags: the {args.domain!r} domain writes one HDF5, not per-slide bags")
    if getattr(args, "slides_csv", None):
        raise ConfigError(f"--slides-csv: the {args.domain!r} domain embeds a folder, not a list of slides")
    size = args.img_size or meta["backbone_args"]["img_size"]
    dataset = _eval_dataset(args.domain, args.data, meta, size)
    device = resolve_device(args.device)
    return embed_dataset(
        backbone,
        dataset,
        Path(args.out),
        backbone_name=str(resolve_backbone_source(args.backbone)),
        size=size,
        pooling=args.pooling,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        amp_dtype=autocast_dtype("auto", device),
        progress=not args.quiet,
        overwrite=args.overwrite,
        normalization=(  # what _eval_dataset normalised with: the backbone's statistics, else the domain's
            {"mean": list(meta["mean"]), "std": list(meta["std"])}
            if meta.get("mean") and meta.get("std")
            else {"mean": "domain default", "std": "domain default"}
        ),
    )


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if not args.backbone:
        raise ConfigError("--backbone is required (a run folder, export folder or checkpoint)")
    backbone, meta = load_backbone(args.backbone)
    source = resolve_backbone_source(args.backbone)
    if args.random_init:
        backbone = random_like(meta, seed=args.seed)
    size = args.img_size or meta["backbone_args"]["img_size"]
    train_set = _eval_dataset(args.domain, args.data, meta, size)
    val_set = _eval_dataset(args.domain, args.val_data, meta, size)
    device = resolve_device(args.device)
    amp = autocast_dtype("auto", device)

    def features(dataset, path: str):
        def compute():
            return extract_features(
                backbone,
                dataset,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=device,
                pooling=args.pooling,
                amp_dtype=amp,
                progress=not args.quiet,
            )

        if not args.cache_dir:
            return compute()
        # the random twin is deterministic (seeded), so its own weights name it: two architectures, or an
        # initialisation that changed between versions, never share a cache entry
        stamp = weights_fingerprint(backbone)
        key = feature_cache_key(stamp, str(Path(path).resolve()), str(size), args.pooling, str(args.seed))
        return cached_features(Path(args.cache_dir), key, compute)

    train_f, train_l, _ = features(train_set, args.data)
    val_f, val_l, _ = features(val_set, args.val_data)
    val_l = remap_labels(list(train_set.classes), list(val_set.classes), val_l, args.val_data)
    num_classes = len(train_set.classes)
    if num_classes < 2:
        raise DataError(f"{args.data}: needs at least two classes (class sub-folders) for evaluation")

    def probe(train_idx: Tensor | None, seed: int) -> dict[str, Any]:
        f, labels = (train_f, train_l) if train_idx is None else (train_f[train_idx], train_l[train_idx])
        if args.protocol == "knn":
            return knn_evaluate(f, labels, val_f, val_l, num_classes, k=args.k, temperature=args.temperature)
        return linear_probe(f, labels, val_f, val_l, num_classes, seed=seed)

    if args.shots is None:
        result = probe(None, args.seed)
    else:
        result = low_shot(probe, train_l, args.shots, args.draws, args.seed)
    return {
        "protocol": args.protocol,
        **result,
        "backbone": str(source),
        "random_init": bool(args.random_init),
        "pooling": args.pooling,
        "n_train": len(train_set),
        "n_val": len(val_set),
    }
