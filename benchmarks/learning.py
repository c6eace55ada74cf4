"""Does a recipe learn? Pretrained vs random-init kNN and linear top-1 on real labelled images shipped in
installed packages, the same probes on the raw pixels, the last DINO loss against ln K (uniform collapse sits
just under it), and the wall time.

Datasets (written once under ``--work``):
- ``digits``: scikit-learn's 1,797 handwritten digits (10 classes), 8x8 upscaled to 32 px RGB; every 5th
  image is validation.
- ``digits_shifted``: the same digits at 20 px, each at a seeded random place on a black 32 px canvas (a class
  is no longer a fixed set of pixels: what crop-invariant features are for).
- ``textures``: scikit-image's brick, grass and gravel photographs (3 classes): 64 px windows every 32 px,
  resized to 32 px; windows wholly in a photo's left half are training (105 per class), wholly in its right half
  validation (105): no pixel is in both.
- ``textures8``: eight scikit-image texture photographs (bricks, grass, gravel, the moon, coins, a printed page,
  handwriting, a deep-sky field; colour ones made grey): 64 px windows every 8 px, 240 training and 120
  validation windows per class spread evenly over each half, resized to 32 px.

Each domain's recipe sees the same 32 px pixels in the formats that domain reads, written with the format's
own library and read back before use; only the train split is pretrained on:
- ``images``: the PNG class folders.
- ``pathology``: the training images as the cells of one tiled TIFF slide (tifffile) whose resolution is the
  recipe's ``mpp``, so every tile is one image, unresampled; evaluated on the PNG folders (tiles). The images are
  grey, and tissue detection finds stained tissue by its saturation, so the slide is read with
  ``data.options.min_tissue=0`` (every cell a tile).
- ``remote_sensing``: one 3-band uint8 RGB GeoTIFF chip per image (rasterio), in class folders per split.
- ``medical``: the training images (grey) as the axial slices of one NIfTI volume (nibabel) at the recipe's
  spacing, grey levels mapped linearly onto its CT window (so the window gives the PNG's level / 255); evaluated
  on one such volume per class and split (the medical domain's labelled-slice layout, ``ROOT/<class>/<volume>``).

    python benchmarks/learning.py                                    # every small recipe, both datasets (hours)
    python benchmarks/learning.py --recipes pathology --datasets digits --steps 50
    python benchmarks/learning.py --recipes images/tiny --datasets digits --steps 150
    python benchmarks/learning.py --recipes images --datasets digits ssl.centering=sinkhorn_knopp   # overrides
    python benchmarks/learning.py --recipes images-mae --datasets digits --seeds 0 1 2   # mean and worst gain
    python benchmarks/learning.py --recipes images --datasets digits --pooling cls+mean   # DINOv2's avgpool probe
    python benchmarks/learning.py --recipes medical --datasets textures8 --shots 10 20    # + linear on 10, 20 labels
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from foundation.cli import main as cli
from foundation.config import Config, load_config
from foundation.eval.features import POOLINGS
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain

# the small recipe of every domain, by the name --recipes also takes
SMALL = {
    "images": "images/small_dinov2",
    "images-mae": "images/small_mae",
    "pathology": "pathology/small",
    "remote_sensing": "remote_sensing/small",
    "medical": "medical/small_dinov2_slices",
}
RECIPES = list(SMALL.values())


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


def write_digits_shifted(root: Path, size: int = 32, digit: int = 20) -> Path:
    """The digits at ``digit`` px, each pasted at a seeded random place on a black ``size`` px canvas: the same
    labels, but a class is no longer a fixed set of pixels (a linear probe on the pixels: 0.27 top-1, against
    0.95 centred), so it measures what crop-invariant features are for."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(0)
    for i, (image, label) in enumerate(zip(data.images, data.target, strict=True)):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((digit, digit), Image.BICUBIC)
        canvas = Image.new("L", (size, size))
        x, y = rng.integers(0, size - digit + 1, size=2)
        canvas.paste(pixels, (int(x), int(y)))
        canvas.convert("RGB").save(folder / f"{i:04d}.png")
    return root


def _windows(photo: np.ndarray, split: str, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the windows wholly inside the photo's left (train) or right (val) half: no pixel is
    in both splits."""
    height, width = photo.shape[:2]
    half = width // 2
    xs = range(0, half - window + 1, stride) if split == "train" else range(half, width - window + 1, stride)
    return [(y, x) for y in range(0, height - window + 1, stride) for x in xs]


def write_textures(
    root: Path,
    size: int = 32,
    names: tuple[str, ...] = ("brick", "grass", "gravel"),
    per_class: int = 225,
    stride: int = 32,
) -> Path:
    """64 px windows of scikit-image photographs, one class per photograph, resized to ``size`` and made grey;
    at most ``per_class`` training windows (half that for validation), evenly spread over the grid."""
    from skimage import data as skdata
    from skimage.color import rgb2gray

    for name in names:
        photo = np.asarray(getattr(skdata, name)())
        if photo.ndim == 3:
            photo = (rgb2gray(photo[..., :3]) * 255).round().astype(np.uint8)
        for split, most in (("train", per_class), ("val", per_class // 2)):
            spots = _windows(photo, split, 64, stride)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in np.unique(np.linspace(0, len(spots) - 1, min(len(spots), most)).round().astype(int)):
                y, x = spots[k]
                window = Image.fromarray(photo[y : y + 64, x : x + 64]).resize((size, size), Image.BICUBIC)
                window.convert("RGB").save(folder / f"{y:04d}_{x:04d}.png")
    return root


def write_textures8(root: Path, size: int = 32) -> Path:
    """Eight scikit-image photographs of textures (bricks, grass, gravel, the moon's surface, coins, a printed
    page, handwriting, a deep-sky field): 240 training and 120 validation windows each."""
    names = ("brick", "grass", "gravel", "moon", "coins", "page", "text", "hubble_deep_field")
    return write_textures(root, size, names, per_class=240, stride=8)


DATASETS = {
    "digits": write_digits,
    "digits_shifted": write_digits_shifted,
    "textures": write_textures,
    "textures8": write_textures8,
}


@dataclass(frozen=True)
class DomainData:
    """What one domain's recipe pretrains on (the train split only) and is evaluated on, and the overrides
    the data needs."""

    pretrain: Path
    train: Path
    val: Path
    overrides: tuple[str, ...] = ()


def labelled_pngs(split: Path) -> list[tuple[str, Path, np.ndarray]]:
    """``(class, file, H x W x 3 uint8)`` of a PNG split, sorted by class then file."""
    files = sorted(split.glob("*/*.png"))
    return [(f.parent.name, f, np.asarray(Image.open(f).convert("RGB"))) for f in files]


def pixel_baseline(png: Path) -> dict:
    """The same kNN and linear probes on the raw pixels (flattened, in [0, 1]), no network at all: what the data
    gives by itself. On centred digits the pixels beat every 32 px backbone measured (kNN 0.98, linear 0.96), so a
    gain there is mostly what a random ViT loses; on textures8 they do not (0.24, 0.59)."""
    from foundation.eval.knn import knn_evaluate
    from foundation.eval.linear import linear_probe

    def split(name: str) -> tuple[torch.Tensor, list[str]]:
        items = labelled_pngs(png / name)
        pixels = np.stack([image.reshape(-1) for _, _, image in items]).astype(np.float32) / 255
        return torch.from_numpy(pixels), [label for label, _, _ in items]

    (train, train_names), (val, val_names) = split("train"), split("val")
    classes = sorted(set(train_names))
    train_labels = torch.tensor([classes.index(c) for c in train_names])
    val_labels = torch.tensor([classes.index(c) for c in val_names])
    knn = knn_evaluate(train, train_labels, val, val_labels, len(classes))["top1"]
    linear = linear_probe(train, train_labels, val, val_labels, len(classes))["top1"]
    return {"knn_pixels": round(knn, 3), "linear_pixels": round(linear, 3)}


def grey(pixels: np.ndarray, name: Path) -> np.ndarray:
    """The one channel of an RGB image whose three channels are equal (refused otherwise: not the same pixels)."""
    if not (pixels == pixels[..., :1]).all():
        raise SystemExit(f"{name}: not a grey image; the medical domain reads one channel")
    return pixels[..., 0]


def write_slide(path: Path, images: list[np.ndarray], mpp: float) -> None:
    """The images as the cells of a tiled RGB TIFF at ``mpp`` um/px (rows x columns, no blank cell), read back
    through the pathology domain's own slide reader."""
    import tifffile

    from foundation_domains.pathology.slide import open_slide

    n, side = len(images), images[0].shape[0]
    rows = max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)  # the squarest grid with every cell used
    cols = n // rows
    grid = np.stack(images).reshape(rows, cols, side, side, 3).transpose(0, 2, 1, 3, 4)
    mosaic = np.ascontiguousarray(grid.reshape(rows * side, cols * side, 3))
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, mosaic, photometric="rgb", tile=(256, 256), **resolution)
    with open_slide(path) as slide:
        back = slide.read_region((0, 0), 0, (cols * side, rows * side))
        if abs(slide.mpp - mpp) > 1e-6 * mpp or not np.array_equal(back, mosaic):
            raise SystemExit(f"{path}: the slide does not read back as written ({slide.mpp} um/px)")


def pathology_data(png: Path, out: Path, cfg: Config) -> DomainData:
    """The train split as one slide at the recipe's resolution (its tiles unresampled); PNG tiles to evaluate."""
    mpp = float(cfg.data.options["mpp"])
    slides = out / "slides"
    slides.mkdir(parents=True)
    write_slide(slides / f"train_{mpp:g}um.tif", [x for _, _, x in labelled_pngs(png / "train")], mpp)
    return DomainData(slides, png / "train", png / "val", ("data.options.min_tissue=0",))


def write_chip(path: Path, pixels: np.ndarray, index: int) -> None:
    """One image as a 3-band uint8 RGB GeoTIFF (10 m pixels, chips side by side in UTM 33N), read back."""
    import rasterio
    from rasterio.transform import from_origin

    side = pixels.shape[0]
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(300_000 + 10 * side * index, 5_000_000, 10, 10),
               "photometric": "RGB"}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels.transpose(2, 0, 1))
    with rasterio.open(path) as src:
        rgb = tuple(c.name for c in src.colorinterp) == ("red", "green", "blue")
        if not (rgb and np.array_equal(src.read().transpose(1, 2, 0), pixels)):
            raise SystemExit(f"{path}: the chip does not read back as written")


def remote_sensing_data(png: Path, out: Path, cfg: Config) -> DomainData:
    """Every image as a GeoTIFF chip in its split's class folder; the train chips are also the pretraining data."""
    index = 0
    for split in ("train", "val"):
        for name, file, pixels in labelled_pngs(png / split):
            write_chip(out / split / name / f"{file.stem}.tif", pixels, index)
            index += 1
    return DomainData(out / "train", out / "train", out / "val")


def write_volume(path: Path, images: list[np.ndarray], cfg: Config) -> None:
    """Grey images as the axial slices of a NIfTI volume at the recipe's spacing, grey level g stored as the
    HU value the recipe's CT window maps to g / 255; read back through the medical domain's own loader and
    slice display (same pixels, unresampled, same orientation)."""
    import nibabel as nib

    from foundation_domains.medical.slices import display_slice
    from foundation_domains.medical.volume import load_volume

    opts = cfg.data.typed_options
    if opts.modality != "ct" or opts.spacing is None:
        raise SystemExit(f"{cfg.data.options}: the benchmark writes CT volumes at a fixed spacing")
    low, high = opts.window
    # display_slice shows voxel (x, y) at row H-1-y, column W-1-x: store each image flipped and transposed
    stack = np.stack([g[::-1, ::-1].T for g in images], axis=-1).astype(np.float32)
    hu = low + stack / 255 * (high - low)
    nib.save(nib.Nifti1Image(hu, np.diag([*opts.spacing, 1.0])), path)
    volume = load_volume(path, opts).array
    back = np.stack([display_slice(volume[..., z])[..., 0] for z in range(volume.shape[-1])])
    if back.shape != (len(images), *images[0].shape) or np.abs(back - np.stack(images) / 255).max() > 1e-5:
        raise SystemExit(f"{path}: the volume does not read back as the images written")


def medical_data(png: Path, out: Path, cfg: Config) -> DomainData:
    """The train split as one volume to pretrain on; one volume per class and split to evaluate on."""
    (out / "pretrain").mkdir(parents=True)
    train = labelled_pngs(png / "train")
    write_volume(out / "pretrain" / "train.nii.gz", [grey(x, f) for _, f, x in train], cfg)
    for split in ("train", "val"):
        items = labelled_pngs(png / split)
        for name in sorted({c for c, _, _ in items}):
            (out / split / name).mkdir(parents=True)
            images = [grey(x, f) for c, f, x in items if c == name]
            write_volume(out / split / name / f"{name}.nii.gz", images, cfg)
    return DomainData(out / "pretrain", out / "train", out / "val")


DOMAIN_DATA = {"pathology": pathology_data, "remote_sensing": remote_sensing_data, "medical": medical_data}


def domain_data(png: Path, cfg: Config) -> DomainData:
    """The dataset in the format ``cfg``'s domain reads (the PNG folders for ``images``), written once per domain
    and data options; ``layout.json`` is written last, so an interrupted write is redone, never reused."""
    if cfg.domain == "images":
        return DomainData(png / "train", png / "train", png / "val")
    options = json.dumps(dict(cfg.data.options or {}), sort_keys=True)
    out = png.parent / f"{png.name}-{cfg.domain}-{hashlib.sha256(options.encode()).hexdigest()[:8]}"
    done = out / "layout.json"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        data = DOMAIN_DATA[cfg.domain](png, out, cfg)
        fields = {"pretrain": data.pretrain, "train": data.train, "val": data.val}
        done.write_text(json.dumps({**{k: str(v) for k, v in fields.items()}, "overrides": data.overrides}))
    layout = json.loads(done.read_text())
    return DomainData(*(Path(layout[k]) for k in ("pretrain", "train", "val")), tuple(layout["overrides"]))


def evaluate(protocol: str, run: Path, domain: str, data: DomainData, *extra: str) -> float:
    """Top-1 of ``foundation evaluate PROTOCOL`` (``extra``: e.g. ``--random-init``) on the labelled folders."""
    out = io.StringIO()
    args = ["evaluate", protocol, "--backbone", str(run), "--domain", domain, "--data", str(data.train)]
    with contextlib.redirect_stdout(out):
        rc = cli([*args, "--val-data", str(data.val), "--quiet", *extra])
    if rc != 0:
        raise SystemExit(f"foundation evaluate {protocol} on {run} exited {rc}")
    return json.loads([x for x in out.getvalue().splitlines() if x.startswith("{")][-1])["top1"]


def loss_summary(run: Path, cfg: Config) -> dict:
    """The last logged loss: DINO's beside ln K (uniform targets sit just under it) and the teacher's entropy."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    if cfg.ssl.method != "dinov2":
        return {"loss_last": round(last["loss"], 3)}
    return {"dino_last": round(last["dino"], 3), "ln_k": round(math.log(cfg.ssl.head_prototypes), 3),
            "teacher_entropy_last": round(last.get("teacher_entropy", float("nan")), 3)}  # fmt: skip


def run_one(
    recipe: str,
    dataset: str,
    png: Path,
    work: Path,
    overrides: list[str],
    seed: int,
    pooling: str = "cls",
    shots: tuple[int, ...] = (),
) -> dict:
    """Pretrain ``recipe`` with ``seed`` on the train split of ``dataset`` in its domain's format, then probe it
    and its random-init twin of the same seed on the ``pooling`` feature: kNN and linear on every label, and
    linear on each of ``shots`` labels a class (mean of 5 seeded draws, the same for both)."""
    overrides = [f"seed={seed}", *overrides]
    cfg = load_config(recipe, overrides)
    data = domain_data(png, cfg)
    cfg = load_config(recipe, [f"data.path={data.pretrain}", *data.overrides, *overrides])
    tag = hashlib.sha256(" ".join(overrides).encode()).hexdigest()[:8]  # runs with other overrides kept apart
    run = work / f"{cfg.domain}-{Path(recipe).stem}-{dataset}-{cfg.train.steps}-{tag}"
    start = time.perf_counter()
    pretrain(cfg, run, DistInfo(0, 1, 0, torch.device("cpu")), quiet=True)
    wall = time.perf_counter() - start
    result = {"recipe": recipe, "domain": cfg.domain, "dataset": dataset, "method": cfg.ssl.method, "seed": seed,
              "steps": cfg.train.steps, "pooling": pooling, "pretrain_seconds": round(wall, 1),
              **loss_summary(run, cfg)}  # fmt: skip
    # one feature extraction per backbone and split, shared by the full and the low-shot probes
    probe = ("--seed", str(seed), "--pooling", pooling, "--cache-dir", str(run / "probe_features"))
    for protocol in ("knn", "linear"):
        trained = evaluate(protocol, run, cfg.domain, data, *probe)
        random = evaluate(protocol, run, cfg.domain, data, *probe, "--random-init")
        result |= {f"{protocol}_pretrained": round(trained, 3), f"{protocol}_random": round(random, 3),
                   f"{protocol}_gain": round(trained - random, 3)}  # fmt: skip
    for n in shots:
        trained = evaluate("linear", run, cfg.domain, data, *probe, "--shots", str(n))
        random = evaluate("linear", run, cfg.domain, data, *probe, "--shots", str(n), "--random-init")
        result |= {f"linear_{n}shot_pretrained": round(trained, 3), f"linear_{n}shot_random": round(random, 3),
                   f"linear_{n}shot_gain": round(trained - random, 3)}  # fmt: skip
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return result


def seed_summary(results: list[dict]) -> dict:
    """Mean of several seeds' rows of one recipe and dataset, with the smallest gain of each probe: a single run
    moves by a few points (thread schedule, seed), so a claimed gain should hold for the worst seed too."""
    first = results[0]
    summary = {k: first[k] for k in ("recipe", "domain", "dataset", "method", "steps", "pooling")}
    summary["seed"] = "mean"
    numbers = [k for k, v in first.items() if isinstance(v, float) and k not in summary]
    summary |= {k: round(sum(r[k] for r in results) / len(results), 3) for k in numbers}
    summary |= {f"{p}_gain_min": min(r[f"{p}_gain"] for r in results) for p in ("knn", "linear")}
    return summary


def table(results: list[dict]) -> str:
    """One row per recipe x dataset: kNN and linear top-1 pretrained / random (gain), on the pixels, loss vs ln K,
    wall."""
    head = (
        f"{'recipe':44} {'dataset':9} {'seed':>4} {'steps':>5}  {'kNN pre/rand (gain)':21}  "
        f"{'linear pre/rand (gain)':21}"
    )
    lines = [
        f"{head}  {'pixels kNN/lin':14} {'loss / ln K':13} {'pretrain s':>10} {'total s':>8}  linear low-shot gain"
    ]
    for r in results:
        probes = [
            f"{r[p + '_pretrained']:.3f}/{r[p + '_random']:.3f} ({r[p + '_gain']:+.3f})"
            for p in ("knn", "linear")
        ]
        loss = (
            f"{r['dino_last']:.3f} / {r['ln_k']:.3f}" if "dino_last" in r else f"{r['loss_last']:.3f} (MAE)"
        )
        pixels = f"{r['knn_pixels']:.3f}/{r['linear_pixels']:.3f}"
        low_shot = " ".join(f"{k.split('_')[1]} {v:+.3f}" for k, v in r.items() if k.endswith("shot_gain"))
        lines.append(f"{r['recipe']:44} {r['dataset']:9} {r['seed']:>4} {r['steps']:>5}  {probes[0]:21}  {probes[1]:21}  "
                     f"{pixels:14} {loss:13} {r['pretrain_seconds']:>10.1f} {r['total_seconds']:>8.1f}  {low_shot}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES,
                    help=f"recipe files, or the small recipe of a domain by name: {', '.join(SMALL)}")  # fmt: skip
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--steps", type=int, default=None, help="override train.steps of every recipe")
    ap.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="pretrain (and build the random twin) once per seed; several add a mean row")  # fmt: skip
    ap.add_argument("--pooling", default="cls", choices=list(POOLINGS),
                    help="the probes' feature: CLS, or CLS + mean patch token (DINOv2's linear avgpool)")  # fmt: skip
    ap.add_argument("--shots", type=int, nargs="+", default=[],
                    help="also a linear probe on N labels a class (5 seeded draws), e.g. --shots 10 20")  # fmt: skip
    ap.add_argument(
        "overrides", nargs="*", help="config overrides for every recipe, e.g. ssl.koleo_loss_weight=0.5"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recipes = [SMALL.get(r, r) for r in a.recipes]
    work = a.work or Path(tempfile.mkdtemp(prefix="foundation-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = (
        ["train.checkpoint_every=1000000"] + ([f"train.steps={a.steps}"] if a.steps else []) + a.overrides
    )
    results = []
    for dataset in a.datasets:
        png = work / "data" / dataset
        if not png.exists():
            DATASETS[dataset](png)
        pixels = pixel_baseline(png)
        for recipe in recipes:
            rows = []
            for seed in a.seeds:
                rows.append(
                    run_one(recipe, dataset, png, work, overrides, seed, a.pooling, tuple(a.shots)) | pixels
                )
                print(json.dumps({"benchmark": "learning", **rows[-1]}))
                sys.stdout.flush()
            if len(rows) > 1:
                rows.append(seed_summary(rows))
                print(json.dumps({"benchmark": "learning", **rows[-1]}))
            results += rows
    print(table(results))


if __name__ == "__main__":
    main()
