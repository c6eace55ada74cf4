"""MONAI/Decathlon datalists (``{"training": [{"image": ..., "label": ...}], "validation": [...]}``), checked up
front from the NIfTI headers alone, so a bad pair is refused before minutes of preprocessing, not mid-training.

Paths are relative to the datalist's folder (or ``--data-root``), as ``monai.data.load_decathlon_datalist``
resolves them. Without a ``validation`` list a deterministic fraction of ``training`` is held out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from foundation.errors import ConfigError, DataError

log = logging.getLogger(__name__)
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3  # mm: float32 headers of the same grid agree far better than this


@dataclass
class Datalist:
    """Checked image/label pairs (absolute paths) and the class names, when the datalist has them."""

    path: Path
    training: list[dict[str, str]]
    validation: list[dict[str, str]]
    labels: dict[str, int] | None  # name -> value, background included
    channels: int


def load_datalist(
    path: str | Path,
    *,
    data_root: str | Path | None = None,
    in_chans: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Datalist:
    """Read and check a datalist.

    Args:
        path: the datalist JSON.
        data_root: folder the relative paths start from; default: the datalist's folder.
        in_chans: the backbone's channels; images must have that many (3D volume: 1).
        val_fraction: share of ``training`` held out (deterministically, from ``seed``) when there is no
            ``validation`` list.

    Raises:
        DataError: unreadable JSON, no ``training`` list, or bad pairs (missing or unreadable files, image and
            label shape or affine mismatch, 4D where 3D is expected); one message lists every bad pair.
        ConfigError: all images have another channel count than the backbone; the message names both.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {str(path)!r}: no such datalist file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON datalist ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list) or not raw["training"]:
        raise DataError(
            f'{path}: a datalist needs a non-empty "training" list of {{"image": ..., "label": ...}} entries'
        )
    root = Path(data_root) if data_root is not None else path.parent
    lists: dict[str, list[dict[str, Any]]] = {}
    for key in ("training", "validation"):
        if key in raw:
            _check_entries(path, key, raw[key])
            lists[key] = load_decathlon_datalist(path, True, key, base_dir=root)
    pairs = lists["training"] + lists.get("validation", [])
    channels = _check_pairs(path, pairs, in_chans)
    training, validation = lists["training"], lists.get("validation")
    if validation is None:
        training, validation = hold_out(training, val_fraction, seed)
    entries = [{"image": str(e["image"]), "label": str(e["label"])} for e in training]
    val = [{"image": str(e["image"]), "label": str(e["label"])} for e in validation]
    return Datalist(path, entries, val, _labels(path, raw.get("labels")), channels)


def hold_out(
    entries: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off ``round(fraction * n)`` entries (at least one) by a seeded permutation; order is kept."""
    n = len(entries)
    if fraction <= 0:
        return entries, []
    if n < 2:
        log.warning("organ segmentation: one training pair only; it is also used for validation")
        return entries, list(entries)
    n_val = min(n - 1, max(1, round(fraction * n)))
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [e for i, e in enumerate(entries) if i not in chosen], [
        e for i, e in enumerate(entries) if i in chosen
    ]


def _check_entries(path: Path, key: str, entries: Any) -> None:
    if not isinstance(entries, list):
        raise DataError(f'{path}: "{key}" must be a list of {{"image": ..., "label": ...}} entries')
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)):
            raise DataError(
                f'{path}: "{key}"[{i}] = {e!r} is not {{"image": "FILE", "label": "FILE"}} '
                "(one NIfTI file each; multi-channel images as one 4D file)"
            )


def _image_channels(shape: tuple[int, ...]) -> int | None:
    """Channels of a 3D (1), 4D channels-last or 5D ``(x, y, z, 1, c)`` image; None: not a volume."""
    if len(shape) == 3:
        return 1
    if len(shape) == 4 or (len(shape) == 5 and shape[3] == 1):
        return int(shape[-1])
    return None


def _check_pair(image_path: Path, label_path: Path) -> tuple[str | None, int | None]:
    """``(problem, image channels)`` from the two headers."""
    missing = [
        f"{kind} file missing"
        for kind, p in (("image", image_path), ("label", label_path))
        if not p.is_file()
    ]
    if missing:
        return "; ".join(missing), None
    try:
        image, label = nib.load(image_path), nib.load(label_path)
    except Exception as e:  # nibabel raises several types for corrupt or foreign files
        return f"not a readable NIfTI pair ({e})", None
    channels = _image_channels(image.shape)
    if channels is None:
        return f"image of shape {image.shape} is not a 3D volume or a 4D volume with channels last", None
    if len(label.shape) > 3 and any(s != 1 for s in label.shape[3:]):
        return f"label map of shape {label.shape} is 4D where a 3D label map is expected", channels
    if tuple(image.shape[:3]) != tuple(label.shape[:3]):
        return f"image shape {image.shape[:3]} != label shape {label.shape[:3]}", channels
    if not np.allclose(image.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        diff = float(np.abs(image.affine - label.affine).max())
        return f"image and label affines differ (by up to {diff:.3g} mm): not the same voxel grid", channels
    return None, channels


def _check_pairs(path: Path, pairs: list[dict[str, Any]], in_chans: int | None) -> int:
    bad: list[str] = []
    counts: dict[int, list[str]] = {}
    for e in pairs:
        image, label = Path(e["image"]), Path(e["label"])
        problem, channels = _check_pair(image, label)
        if problem:
            bad.append(f"{image} / {label}: {problem}")
        elif channels is not None:
            counts.setdefault(channels, []).append(str(image))
    if in_chans is not None and not bad and set(counts) == {next(iter(counts))} and in_chans not in counts:
        raise ConfigError(
            f"the backbone takes {in_chans} channel(s) but the images of {path} have {next(iter(counts))} "
            f"(e.g. {next(iter(counts.values()))[0]}); "
            "use a backbone pretrained on this kind of data (model.in_chans for --random-init)"
        )
    expected = in_chans if in_chans is not None else max(counts, key=lambda c: len(counts[c]), default=1)
    for c, images in sorted(counts.items()):
        if c != expected:
            what = "a 4D image" if expected == 1 else f"{c} channel(s)"
            want = "a 3D volume" if expected == 1 else f"{expected} channel(s)"
            bad += [f"{image}: {what} ({c} channels) where {want} is expected" for image in images]
    if bad:
        listing = "\n  ".join(bad)
        raise DataError(f"{path}: {len(bad)} bad image/label pair(s):\n  {listing}")
    return expected


def _labels(path: Path, labels: Any) -> dict[str, int] | None:
    """Decathlon ``{"0": "background", "1": "liver"}`` (or ``{"liver": 1}``) as ``{name: value}``."""
    if labels is None:
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):
            out = {str(name): int(value) for value, name in labels.items()}
        else:
            out = {str(name): int(value) for name, value in labels.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(
            f'{path}: "labels" must map values to names, e.g. {{"0": "background", "1": "liver"}}'
        ) from e
    if len(set(out.values())) != len(out):
        raise DataError(f'{path}: "labels" gives two names the same value: {labels!r}')
    return out


def sample_datalist(val_count: int = 1) -> Path:
    """The datalist of the medical domain's phantoms (made once), written once and atomically next to them:
    ``<cache>/samples/medical-organseg/datalist.json`` with paths relative to itself."""
    from foundation.data.samples import write_sample_folder
    from foundation.domain import sample_cache_dir
    from foundation_domains.medical.phantom import LABELS, make_sample_volumes

    phantoms = make_sample_volumes(sample_cache_dir("medical"))
    root = sample_cache_dir("medical-organseg")

    def fill(tmp: Path) -> None:
        meta = json.loads((phantoms / "dataset.json").read_text())
        rel = Path("..") / phantoms.name
        pairs = [{k: str(rel / e[k]) for k in ("image", "label")} for e in meta["training"]]
        datalist = {
            "name": "AbdomenPhantom organ segmentation",
            "labels": {str(v): k for k, v in LABELS.items()},
            "training": pairs[:-val_count],
            "validation": pairs[-val_count:],
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=2))

    return write_sample_folder(root, fill) / "datalist.json"
