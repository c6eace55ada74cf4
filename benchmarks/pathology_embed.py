"""``foundation embed --domain pathology`` end to end against the backbone alone, and its memory vs slide count.

Throughput: tiles/s of the whole command (tissue planning, tile reading in worker processes, normalisation,
backbone, HDF5 writing) divided by tiles/s of the same backbone on the same tiles already in memory, in the same
batches. Both sides run the model with the same number of torch threads, so the ratio says how much of the
reading and writing the pipeline hides behind the model (target >= 0.85).

Memory: peak RSS of the command (main process + tile workers) on 1 slide and on ``--slides`` slides, each in a
fresh subprocess; a ratio near 1 means memory does not grow with the number of slides.

    python benchmarks/pathology_embed.py                       # vit_tiny at 224 px, CPU, 3 synthetic slides
    python benchmarks/pathology_embed.py --arch vit_base --device cuda --batch-size 256 --workers 8 --slides 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from foundation.eval.features import _pool
from foundation.export import export_backbone, load_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology.embed import TileDataset, embed_slides
from foundation_domains.pathology.sample import synthetic_he, write_pyramid_tiff
from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.source import PathologyOptions, list_slides
from foundation_domains.pathology.tissue import mask_for_tiles, plan_tiles

DESCRIPTION = "Aperio Image Library v12.0.0 \r\n{w}x{h} (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.25"

_PEAK_RSS = """
import json, re, resource, sys
from pathlib import Path
from foundation.cli import main
rc = main(sys.argv[1:])
# VmHWM: this process's peak since exec (ru_maxrss would carry the forking parent's peak over the exec)
main_kib = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc, "main_mib": main_kib / 1024, "worker_mib": workers_kib / 1024}))
"""


def make_slides(root: Path, count: int, width: int, height: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        path = root / f"slide_{k:03d}.svs"
        if not path.is_file():
            image = synthetic_he(width, height, seed=k)
            write_pyramid_tiff(path, image, DESCRIPTION.format(w=width, h=height))
    return root


def embed_args(data: Path, backbone: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        "embed", "--domain", "pathology", "--data", str(data), "--backbone", str(backbone), "--out", str(out),
        "--batch-size", str(a.batch_size), "--num-workers", str(a.workers), "--device", a.device, "--quiet",
        f"data.options.mpp={a.mpp}",
    ]  # fmt: skip


def preloaded_batches(data: Path, mpp: float, tile: int, batch: int) -> list[torch.Tensor]:
    """Every tile the command embeds (same tissue threshold), read once into uint8 batches (the baseline's
    input)."""
    min_tissue = PathologyOptions().min_tissue
    batches = []
    for path in list_slides(data):
        with open_slide(path) as slide:
            tiling = plan_tiles(slide, mask_for_tiles(slide, mpp, tile), mpp, tile, min_tissue)
        dataset = TileDataset(path, None, tiling)
        tiles = [dataset[i][0] for i in range(len(dataset))]
        dataset.close()
        batches += [torch.stack(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=(6144, 4608), help="slide width height (level 0)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model, both sides")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    work = Path(tempfile.mkdtemp(prefix="foundation-embed-bench-"))
    data = make_slides(work / "slides", a.slides, *a.size)
    one = work / "one"
    one.mkdir()
    (one / "slide_000.svs").symlink_to(data / "slide_000.svs")

    torch.manual_seed(0)
    args = {"arch": a.arch, "in_chans": 3, "img_size": 224, "patch_size": 16, "init_values": 1e-5}
    export = export_backbone(build_vit(**args), args, work / "backbone", mean=(0.7,) * 3, std=(0.15,) * 3)
    backbone, meta = load_backbone(export)
    backbone = backbone.to(device).eval()

    batches = preloaded_batches(data, a.mpp, 224, a.batch_size)
    n_tiles = sum(len(b) for b in batches)
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)

    def model_only() -> None:
        for images in batches:
            x = images.to(device).float().div_(255).sub_(mean).div_(std)
            with torch.inference_mode():
                _pool(backbone.forward_dict(x), "cls").float().cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def end_to_end(k: int) -> None:
        from foundation.cli import build_parser

        ns = build_parser(with_domain_commands=False).parse_args(
            embed_args(data, export, work / f"out{k}", a)
        )
        done = embed_slides(backbone, meta, ns)["tiles"]
        assert done == n_tiles, f"embed wrote {done} tiles, the baseline ran {n_tiles}"

    times: dict[str, list[float]] = {"model": [], "embed": []}
    model_only()  # warm-up
    for k in range(a.repeats):  # interleaved, so machine noise hits both sides alike
        t = time.perf_counter()
        model_only()
        times["model"].append(time.perf_counter() - t)
        t = time.perf_counter()
        end_to_end(k)
        times["embed"].append(time.perf_counter() - t)
    model_rate = n_tiles / min(times["model"])
    embed_rate = n_tiles / min(times["embed"])

    def peak(folder: Path, name: str) -> float:
        cmd = [sys.executable, "-c", _PEAK_RSS, *embed_args(folder, export, work / name, a)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    rss_one, rss_all = peak(one, "rss1"), peak(data, "rssN")
    print(
        json.dumps(
            {
                "benchmark": "pathology_embed",
                "arch": a.arch,
                "device": a.device,
                "threads": a.threads,
                "workers": a.workers,
                "tiles": n_tiles,
                "model_only_tiles_s": round(model_rate, 1),
                "embed_tiles_s": round(embed_rate, 1),
                "ratio_embed_vs_model": round(embed_rate / model_rate, 3),
                "peak_rss_mib_1_slide": {k: round(v, 1) for k, v in rss_one.items()},
                f"peak_rss_mib_{a.slides}_slides": {k: round(v, 1) for k, v in rss_all.items()},
                "ratio_rss_many_vs_one": round(
                    (rss_all["main_mib"] + rss_all["worker_mib"])
                    / (rss_one["main_mib"] + rss_one["worker_mib"]),
                    3,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
