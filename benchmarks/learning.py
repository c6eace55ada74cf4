"""Does a recipe learn? Pretrained vs random-init kNN and linear top-1 on real labelled images shipped in
installed packages, the last DINO loss against ln K (uniform collapse sits just under it), and the wall time.

Datasets (written once under ``--work``):
- ``digits``: scikit-learn's 1,797 handwritten digits (10 classes), 8x8 upscaled to 32 px RGB; every 5th
  image is validation.
- ``textures``: scikit-image's brick, grass and gravel photographs (3 classes): 64 px windows every 32 px over
  each 512 px photo (225 per class), resized to 32 px; windows starting in the right half are validation.

    python benchmarks/learning.py                                    # the small recipes, both datasets
    python benchmarks/learning.py --recipes configs/images/tiny.yaml --datasets digits --steps 150
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from foundation.cli import main as cli
from foundation.config import load_config
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain

RECIPES = ["configs/images/small_dinov2.yaml", "configs/images/small_mae.yaml"]


def write_digits(root: Path, size: int = 32) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images, data.target, strict=True)):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB").save(
            folder / f"{i:04d}.png"
        )
    return root


def write_textures(root: Path, size: int = 32) -> Path:
    from skimage import data as skdata

    for name in ("brick", "grass", "gravel"):
        photo = np.asarray(getattr(skdata, name)(), dtype=np.uint8)
        height, width = photo.shape[:2]
        step = 32
        for y in range(0, height - 64 + 1, step):
            for x in range(0, width - 64 + 1, step):
                split = "val" if x >= width // 2 else "train"
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                window = Image.fromarray(photo[y : y + 64, x : x + 64]).resize((size, size), Image.BICUBIC)
                window.convert("RGB").save(folder / f"{y:03d}_{x:03d}.png")
    return root


DATASETS = {"digits": write_digits, "textures": write_textures}


def evaluate(protocol: str, run: Path, data: Path, *extra: str) -> float:
    out = io.StringIO()
    args = ["evaluate", protocol, "--backbone", str(run), "--data", str(data / "train")]
    with contextlib.redirect_stdout(out):
        rc = cli([*args, "--val-data", str(data / "val"), "--quiet", *extra])
    if rc != 0:
        raise SystemExit(f"foundation evaluate {protocol} on {run} exited {rc}")
    return json.loads([x for x in out.getvalue().splitlines() if x.startswith("{")][-1])["top1"]


def run_one(recipe: str, dataset: str, data: Path, work: Path, overrides: list[str]) -> dict:
    run = work / f"{Path(recipe).stem}-{dataset}"
    cfg = load_config(recipe, [f"data.path={data / 'train'}", *overrides])
    start = time.perf_counter()
    pretrain(cfg, run, DistInfo(0, 1, 0, torch.device("cpu")), quiet=True)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    result = {"recipe": recipe, "dataset": dataset, "method": cfg.ssl.method, "steps": cfg.train.steps,
              "pretrain_seconds": round(wall, 1)}  # fmt: skip
    if cfg.ssl.method == "dinov2":
        last = losses[-1]
        result |= {"dino_last": round(last["dino"], 3), "ln_k": round(math.log(cfg.ssl.head_prototypes), 3),
                   "teacher_entropy_last": round(last.get("teacher_entropy", float("nan")), 3)}  # fmt: skip
    else:
        result["loss_last"] = round(losses[-1]["loss"], 3)
    for protocol in ("knn", "linear"):
        trained = evaluate(protocol, run, data)
        random = evaluate(protocol, run, data, "--random-init")
        result |= {f"{protocol}_pretrained": round(trained, 3), f"{protocol}_random": round(random, 3),
                   f"{protocol}_gain": round(trained - random, 3)}  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--steps", type=int, default=None, help="override train.steps of every recipe")
    ap.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="foundation-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = ["train.checkpoint_every=1000000"] + ([f"train.steps={a.steps}"] if a.steps else [])
    for dataset in a.datasets:
        data = work / "data" / dataset
        if not data.exists():
            DATASETS[dataset](data)
        for recipe in a.recipes:
            print(json.dumps({"benchmark": "learning", **run_one(recipe, dataset, data, work, overrides)}))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
