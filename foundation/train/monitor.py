"""Watching pretraining learn (main rank): the DINO kNN protocol on the teacher (MAE: the encoder) every
``eval.every`` steps, a picture of the first batch's crops and the PCA of fixed inputs' patch tokens.

Nothing here touches the training stream: the evaluation runs in a forked RNG state on its own deterministic
data, in eval mode and without gradients, and the crops are drawn from a batch the step uses anyway. A run with
monitoring on has the losses and weights of a run without it (exact resume and DDP equality still hold).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.config import Config
from foundation.data.spec import DataSpec
from foundation.domain import Domain
from foundation.errors import DataError
from foundation.eval.features import extract_features, remap_labels
from foundation.eval.knn import knn_top1
from foundation.plotting import write_png
from foundation.precision import autocast_dtype
from foundation.report.crops import CropSample, crop_grid
from foundation.visualize.inputs import from_normalised
from foundation.visualize.pipeline import fit, overview, see

log = logging.getLogger(__name__)

IMAGES = "images"  # under the run folder
MAX_CROP_SAMPLES = 4  # rows of the crop grid


@dataclass(frozen=True)
class KnnSets:
    """The labelled folders of ``eval.knn``, read once when the run is set up (errors before any step)."""

    train: Any
    val: Any
    num_classes: int


def _labelled(domain: Domain, path: str, cfg: Config, key: str, spec: DataSpec | None) -> Any:
    try:
        dataset = domain.eval_dataset(path, cfg, spec)
    except DataError as e:
        raise DataError(f"eval.knn.{key}={path!r}: {e}") from e
    if len(dataset) == 0:
        raise DataError(f"eval.knn.{key}={path!r}: no labelled images (expected one sub-folder per class)")
    return dataset


def load_knn_sets(domain: Domain, cfg: Config, spec: DataSpec | None = None) -> KnnSets | None:
    """The kNN folders as the domain's labelled datasets (normalised as the training data, ``spec``), checked:
    two or more classes, val classes known.

    Raises:
        DataError: a folder without class sub-folders, with one class, or with val classes not in train.
    """
    knn = cfg.eval.knn
    if knn.train is None:
        return None
    train = _labelled(domain, knn.train, cfg, "train", spec)
    val = _labelled(domain, knn.val, cfg, "val", spec)
    classes = list(train.classes)
    if len(classes) < 2:
        raise DataError(
            f"eval.knn.train={knn.train!r}: {len(classes)} class ({', '.join(classes)}); the kNN protocol needs "
            "two or more class sub-folders"
        )
    unknown = sorted(set(val.classes) - set(classes))
    if unknown:
        raise DataError(f"eval.knn.val={knn.val!r}: classes {unknown} do not occur in eval.knn.train")
    return KnnSets(train, val, len(classes))


def _png_path(run_dir: Path, name: str, step: int) -> Path:
    return run_dir / IMAGES / f"{name}_step{step:08d}.png"


def _write(path: Path, png: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    write_png(path, png)


def per_sample_views(batch: dict[str, Any]) -> list[list[tuple[str, torch.Tensor]]]:
    """Each sample's named views from a collated batch: DINOv2's crops are stacked crop-major
    (``[crop 0 of every sample, crop 1 of every sample, ...]``, see ``collate_views``), MAE's one view per row."""
    if isinstance(batch.get("global_crops"), torch.Tensor):
        n = batch["global_crops"].shape[0] // 2  # always two global crops
        stacks = [("global", batch["global_crops"])]
        if isinstance(batch.get("local_crops"), torch.Tensor):
            stacks.append(("local", batch["local_crops"]))
    elif isinstance(batch.get("image"), torch.Tensor):
        n, stacks = batch["image"].shape[0], [("MAE view", batch["image"])]
    else:
        return []
    views: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(n)]
    for label, stack in stacks:
        for j in range(stack.shape[0] // n):
            for i in range(n):
                name = label if label == "MAE view" else f"{label} {j + 1}"
                views[i].append((name, stack[j * n + i].detach().float().cpu()))
    return views


class PretrainMonitor:
    """kNN, crop grid and PCA picture of one pretraining run; every method runs on the main rank only."""

    def __init__(self, cfg: Config, knn: KnnSets | None, mean: tuple[float, ...], std: tuple[float, ...]):
        self.cfg = cfg
        self.knn = knn
        self.mean, self.std = mean, std
        self.crops_done = False

    @classmethod
    def build(cls, cfg: Config, domain: Domain, spec: DataSpec) -> PretrainMonitor | None:
        """None when nothing is monitored (no kNN folders, no pictures)."""
        knn = load_knn_sets(domain, cfg, spec)
        if knn is None and not cfg.eval.images:
            return None
        return cls(cfg, knn, spec.mean, spec.std)

    def due(self, step: int, total: int) -> bool:
        """kNN after step ``step`` (0-based): every ``eval.every`` steps and after the last one."""
        every = self.cfg.eval.every
        return self.knn is not None and (step + 1 == total or (every > 0 and (step + 1) % every == 0))

    # -- pictures --------------------------------------------------------------------------------------------
    def crops(self, batch: dict[str, Any], step: int, run_dir: Path) -> tuple[str, bytes] | None:
        """The first batch's views (global and local, or MAE's), de-normalised: one row per sample."""
        if self.crops_done or not self.cfg.eval.images:
            return None
        self.crops_done = True
        views = per_sample_views(batch)
        if not views:
            return None
        samples = [CropSample(tuple(v), self.mean, self.std) for v in views[:MAX_CROP_SAMPLES]]
        png = crop_grid(samples)
        _write(_png_path(run_dir, "crops", step), png)
        return "crops", png

    # -- kNN and PCA -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, device: torch.device, step: int, run_dir: Path):
        """``({"knn/top1": ...}, [(tag, png), ...])``; the global RNG state is restored afterwards."""
        assert self.knn is not None
        knn = self.knn
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            amp = autocast_dtype("auto", device)
            train_f, train_l, _ = extract_features(backbone, knn.train, device=device, amp_dtype=amp)
            val_f, val_l, _ = extract_features(backbone, knn.val, device=device, amp_dtype=amp)
            top1 = knn_top1(
                train_f,
                train_l,
                val_f,
                remap_labels(
                    list(knn.train.classes), list(knn.val.classes), val_l, str(self.cfg.eval.knn.val)
                ),
                knn.num_classes,
                k=self.cfg.eval.knn.k,
                temperature=self.cfg.eval.knn.temperature,
            )
            pictures = self._pca(backbone, device, step, run_dir) if self.cfg.eval.images else []
        return {"knn/top1": top1}, pictures

    def _pca(self, backbone: nn.Module, device: torch.device, step: int, run_dir: Path):
        """PCA of the patch tokens of the first ``eval.pca_inputs`` kNN validation images, one fit over them."""
        was_training = backbone.training
        backbone.eval()
        try:
            n = min(self.cfg.eval.pca_inputs, len(self.knn.val))
            items = [
                from_normalised(f"val{i}", f"val {i + 1}", self.knn.val[i]["image"], self.mean, self.std)
                for i in range(n)
            ]
            seen = see(backbone, items, mean=self.mean, std=self.std, device=device)
            png = overview(seen, fit(seen), f"teacher after step {step + 1}: PCA of patch tokens")
        finally:
            backbone.train(was_training)
        _write(_png_path(run_dir, "pca", step + 1), png)
        return [("pca", png)]
