"""A small labelled sample made on the spot, so ``foundation pretrain`` works before a user has data.

Three visually distinct classes (discs, squares, stripes) in random colours and positions: enough for a
pretraining smoke run and a kNN sanity check, and written deterministically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from foundation.data.samples import write_sample_folder


def _draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 80, 3))
    fg = tuple(int(v) for v in rng.integers(120, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        r = int(rng.integers(size // 8, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        if kind == "discs":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif kind == "squares":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    if kind == "stripes":
        step = int(rng.integers(6, 14))
        for x in range(int(rng.integers(0, step)), size, step):
            d.line([(x, 0), (x, size)], fill=fg, width=max(2, step // 3))
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_sample_images(root: Path, per_class: int = 40, size: int = 96, seed: int = 0) -> Path:
    """Write ``root/{discs,squares,stripes}/*.png`` once (atomically) and return ``root``."""

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for kind in ("discs", "squares", "stripes"):
            (tmp / kind).mkdir()
            for i in range(per_class):
                _draw(kind, rng, size).save(tmp / kind / f"{kind}_{i:03d}.png")

    return write_sample_folder(root, fill)
