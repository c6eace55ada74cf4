"""A folder of images: listing and decoding, an endless sample stream over it, and the labelled evaluation dataset
(class sub-folders give labels, torchvision's ImageFolder layout). In the core because several domains read
image folders (the images domain trains on them; pathology and others evaluate on folders of tiles)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from foundation.data.seeding import generator_for
from foundation.data.views import EvalView
from foundation.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageFolder:
    """Sorted image files under ``root`` (recursive) and their class names (first sub-folder, '' at the root)."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {str(root)!r} is not a folder of images")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data folder {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
        classes = tuple(sorted(set(names)))
        index = {c: i for i, c in enumerate(classes)}
        return cls(root, tuple(files), tuple(index[n] for n in names), classes)

    def __len__(self) -> int:
        return len(self.files)


def read_rgb(path: Path) -> np.ndarray:
    """Decode to ``H x W x 3`` uint8; grey, palette and alpha images are converted (alpha onto white).

    Raises:
        DataError: the file is not a decodable image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = ((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
                return np.repeat(arr[:, :, None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e


class ImageSampleSource:
    """Endless stream over a folder: epoch ``e`` visits every file once in a permutation seeded by ``(seed, e)``.

    Files that fail to decode are named in the log once, counted, and replaced by the next index, so a few
    broken files never stop a run.
    """

    def __init__(self, folder: ImageFolder, seed: int) -> None:
        self.folder = folder
        self.seed = seed
        self.broken: set[Path] = set()

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs in flight at most; the source lives as long as the run
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.folder), generator=generator_for(self.seed, epoch, 0x1A6E))

    def path_at(self, index: int) -> Path:
        n = len(self.folder)
        return self.folder.files[int(self._permutation(index // n)[index % n])]

    def sample(self, index: int, generator: torch.Generator) -> dict:
        for attempt in range(len(self.folder)):
            path = self.path_at(index + attempt)
            try:
                return {"image": read_rgb(path), "path": str(path)}
            except DataError as e:
                if path not in self.broken:
                    self.broken.add(path)
                    log.warning("skipping unreadable image (%d so far): %s", len(self.broken), e)
        raise DataError(f"no image in {str(self.folder.root)!r} could be decoded")


class ImageFolderDataset:
    """Labelled, ordered images at the evaluation size (``dataset[i] -> {"image", "label", "id"}``)."""

    def __init__(self, folder: ImageFolder, size: int, mean, std) -> None:
        self.folder = folder
        self.classes = list(folder.classes)
        self.view = EvalView(size, mean, std)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.folder.files[index]
        return {"image": self.view(read_rgb(path)), "label": self.folder.labels[index], "id": str(path)}
