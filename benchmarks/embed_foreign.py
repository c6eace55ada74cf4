"""``foundation embed`` with a foreign timm ViT-B/16 folder vs the bare timm model, same process, same tensors.

A Hugging Face layout folder (``timm.models.save_for_hf``: config.json + model.safetensors, random weights)
is given to ``foundation embed --backbone`` for the images domain (a folder of PNGs) and for pathology
(synthetic slides). The baseline is timm's own model (``forward_features`` + ``forward_head(pre_logits=True)``)
on the same inputs already in memory as float tensors, in the same batches and threads (the command gets
``--threads`` too: left to size itself it would take every CPU less its loader workers). Both sides must count
the same items (checked). The ratio (embed items/s over timm items/s) says what the whole command costs beyond
the model: start-up, weights fingerprint, tissue planning, reading in loader workers, writing and checking the
HDF5 (target >= 0.9 on CPU).

    python benchmarks/embed_foreign.py                       # CPU, 64 images, 1 synthetic slide
    python benchmarks/embed_foreign.py --images 256 --slides 2 --threads 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pathology_embed import make_slides, preloaded_batches  # noqa: E402

from foundation.cli import main as cli  # noqa: E402

ARCH = "vit_base_patch16_224"


def write_images(root: Path, count: int, size: int) -> list[torch.Tensor]:
    """PNGs in two class folders, and the same pixels as normalised float tensors (the baseline's input)."""
    rng = np.random.default_rng(0)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)  # vit_base_patch16_224's pretrained_cfg (inception)
    tensors = []
    for k in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        folder = root / f"class_{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{k:04d}.png")
        tensors.append((torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / 0.5)
    return tensors


def timm_seconds(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model.forward_head(model.forward_features(x), pre_logits=True).float().numpy()
    return time.perf_counter() - t


def run(argv: list[str]) -> float:
    t = time.perf_counter()
    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"foundation {' '.join(argv)} exited {rc}")
    return time.perf_counter() - t


def check_count(what: str, embedded: int, baseline: int) -> None:
    if embedded != baseline:
        raise SystemExit(f"{what}: embed wrote {embedded} items, the timm baseline ran {baseline}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--slides", type=int, default=1)
    ap.add_argument("--size", type=int, nargs=2, default=(6144, 4608), help="slide width height (level 0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="foundation-foreign-bench-"))
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0).eval()
    save_for_hf(model, str(work / "hf"), safe_serialization=True)
    common = ["--backbone", str(work / "hf"), "--batch-size", str(a.batch_size),
              "--num-workers", str(a.workers), "--device", "cpu", "--quiet", "--overwrite",
              "--threads", str(a.threads)]  # fmt: skip

    tensors = write_images(work / "images", a.images, 224)
    image_batches = [torch.stack(tensors[i : i + a.batch_size]) for i in range(0, len(tensors), a.batch_size)]
    data = make_slides(work / "slides", a.slides, *a.size)
    tiles = [b.float().div(255).sub(0.5).div(0.5) for b in preloaded_batches(data, 0.5, 224, a.batch_size)]
    n_tiles = sum(len(b) for b in tiles)

    times: dict[str, list[float]] = {
        k: [] for k in ("timm_images", "embed_images", "timm_tiles", "embed_tiles")
    }
    timm_seconds(model, image_batches[:1])  # warm-up
    for k in range(a.repeats):  # interleaved, so machine noise hits both sides alike
        times["timm_images"].append(timm_seconds(model, image_batches))
        times["embed_images"].append(run(["embed", "--data", str(work / "images"), "--out",
                                          str(work / f"images{k}.h5"), *common]))  # fmt: skip
        with h5py.File(work / f"images{k}.h5", "r") as f:
            check_count("images", len(f["features"]), a.images)
        times["timm_tiles"].append(timm_seconds(model, tiles))
        times["embed_tiles"].append(run(["embed", "--domain", "pathology", "--data", str(data), "--out",
                                         str(work / f"tiles{k}"), *common, "data.options.mpp=0.5"]))  # fmt: skip
        summary = json.loads((work / f"tiles{k}" / "summary.json").read_text())
        check_count("pathology", summary["tiles"], n_tiles)
    best = {k: min(v) for k, v in times.items()}

    def paired(what: str) -> float:
        return round(float(np.median(np.divide(times[f"timm_{what}"], times[f"embed_{what}"]))), 3)

    print(
        json.dumps(
            {
                "benchmark": "embed_foreign",
                "arch": ARCH,
                "threads": a.threads,
                "images": a.images,
                "tiles": n_tiles,
                "ratio_images_embed_vs_timm": round(best["timm_images"] / best["embed_images"], 3),
                "ratio_pathology_embed_vs_timm": round(best["timm_tiles"] / best["embed_tiles"], 3),
                # on a busy machine one lucky run moves a best-of ratio: the median of the interleaved pairs too
                "median_pair_ratio_images": paired("images"),
                "median_pair_ratio_pathology": paired("tiles"),
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "runs": {k: [round(x, 2) for x in v] for k, v in times.items()},  # the noise, in plain sight
            }
        )
    )


if __name__ == "__main__":
    main()
