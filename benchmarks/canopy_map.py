"""Canopy-height map CLI: throughput against model-only inference, memory against scene size, seams.

1. Throughput: ``foundation canopy-height`` end to end (checkpoint load, windowed reads, normalisation,
   blending, strip writes, COG translation + validation), run in this process, against ``predict_height`` on
   the same tiles (same grid and overlap) already normalised in memory, same batch size, same precision.
   Both in Mpx of scene per second; ratio target >= 0.85.
2. Memory: peak RSS of the CLI in a fresh process on a large scene over that on a scene 4x smaller per side,
   same settings; target <= 1.25.
3. Seams: mean absolute gradient across tile seams over that in tile interiors of the map of a smooth scene
   (``tiling.seam_ratio``); target <= 1.2. The same measure on unblended tiles (overlap 0) is printed too.

The model is an untrained vit_tiny + DPT head (weights do not change speed or memory). Defaults are sized for
a CPU run of a few minutes; the issue's figures:

    python benchmarks/canopy_map.py                   # CPU: 2048^2 throughput, 512^2 vs 2048^2 RSS
    python benchmarks/canopy_map.py --size 2048 --rss-sizes 2048 8192 --patch 16 --features 64 \\
        --batch-size 64 --device cuda                                 # GPU, the issue's sizes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from foundation.cli import main as cli_main
from foundation.models.vit import build_vit
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.remote_sensing.canopy.mapping import MapOptions, open_scene
from foundation_domains.remote_sensing.canopy.meta import CanopyMeta
from foundation_domains.remote_sensing.canopy.model import build_canopy_net, load_canopy
from foundation_domains.remote_sensing.canopy.tiling import (
    TileGrid,
    autocast_dtype,
    predict_batch,
    predict_image,
    resolve_device,
    seam_ratio,
)

BANDS = 4


def make_checkpoint(path: Path, tile: int, patch: int, features: int) -> Path:
    torch.manual_seed(0)
    backbone_args = {"arch": "vit_tiny", "in_chans": BANDS, "img_size": tile, "patch_size": patch}
    head = {"mode": "regression", "features": features}
    net = build_canopy_net(build_vit(**backbone_args), head)
    meta = CanopyMeta(
        head=head, in_chans=BANDS, mean=(0.1,) * BANDS, std=(0.05,) * BANDS, tile_size=tile, gsd=10.0
    )
    config = {}
    return save_task_model(
        path,
        task="canopy-height",
        task_meta=meta.to_dict(),
        backbone_args=backbone_args,
        net=net,
        config=config,
        step=0,
    )


def make_scene(path: Path, size: int, strip: int = 512) -> Path:
    """A smooth uint16 scene (gentle waves over a gradient), written strip by strip (bounded memory)."""
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": BANDS,
        "dtype": "uint16",
        "crs": "EPSG:32633",
        "transform": Affine(10, 0, 300_000, 0, -10, 5_000_000),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    xx = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, strip):
            yy = np.arange(r0, min(size, r0 + strip), dtype=np.float32)[:, None]
            bands = [
                1000 + 300 * np.sin(xx / (150 + 40 * b)) * np.cos(yy / (190 + 30 * b)) + 0.05 * (xx + yy)
                for b in range(BANDS)
            ]
            data = np.stack(bands).astype("uint16")
            dst.write(data, window=Window(0, r0, size, data.shape[1]))
    return path


def model_only(ckpt: Path, scene: Path, tile: int, overlap: int, batch: int, device: str, precision: str):
    """A function running ``predict_height`` over the scene's tiles, pre-cut and normalised in memory."""
    model = load_canopy(ckpt)
    net, meta = model.net, model.meta
    dev = resolve_device(device)
    net = net.to(dev)
    opts = MapOptions(tile=tile, overlap=overlap, device=dev)
    with open_scene(scene, meta, opts) as s:
        grid = TileGrid(s.ds.height, s.ds.width, tile, overlap)
        image = s.read(0, grid.height, 0, grid.width)[0]  # pixels (the masks are not needed)
    tiles = np.stack([image[:, y : y + tile, x : x + tile] for y in grid.ys for x in grid.xs])
    amp = autocast_dtype(precision, dev)

    def run() -> None:
        for i in range(0, len(tiles), batch):
            predict_batch(net, tiles[i : i + batch], dev, amp)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return run, net, meta, image, grid


def cli_args(scene: Path, ckpt: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        "canopy-height",
        str(scene),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--batch-size",
        str(a.batch_size),
        "--overlap",
        str(a.overlap),
        "--device",
        a.device,
        "--precision",
        a.precision,
    ]


def quiet_cli(argv: list[str]) -> None:
    """The CLI in this process, its per-scene JSON lines kept off our output."""
    with contextlib.redirect_stdout(io.StringIO()):
        if cli_main(argv) != 0:
            raise SystemExit(f"CLI run failed: {argv}")


def peak_rss_mb(argv: list[str]) -> float:
    """Peak RSS of the CLI run in a fresh interpreter: its VmHWM (``ru_maxrss`` would carry over the
    parent's high-water mark across fork + exec on Linux)."""
    code = (
        "import json, sys\n"
        "from foundation.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(json.dumps({'rc': rc, 'rss_kb': int(hwm)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    last = [line for line in res.stdout.splitlines() if '"rss_kb"' in line]
    if res.returncode != 0 or not last:
        raise SystemExit(f"CLI run failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(last[-1])["rss_kb"] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="side of the throughput / seam scene")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=[512, 2048], help="small and large scene sides")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument(
        "--patch", type=int, default=32, help="backbone patch size (16 as in the paper; 32: faster)"
    )
    ap.add_argument("--features", type=int, default=8, help="DPT head channels")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--parts", nargs="+", default=["throughput", "rss"], choices=["throughput", "rss"], help="what to run"
    )
    ap.add_argument("--workdir", help="folder for scenes and maps (default: a temporary folder)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint(work / "model.pt", a.tile, a.patch, a.features)
        result: dict[str, object] = {
            "benchmark": "canopy_map",
            "device": str(resolve_device(a.device)),
            "tile": a.tile,
            "overlap": a.overlap,
            "patch": a.patch,
            "batch_size": a.batch_size,
        }
        if "throughput" in a.parts:
            result.update(throughput_and_seams(a, work, ckpt))
        if "rss" in a.parts:
            small, large = (make_scene(work / f"rss{s}.tif", s) for s in a.rss_sizes)
            rss_small = peak_rss_mb(cli_args(small, ckpt, work / "rss_small.tif", a))
            rss_large = peak_rss_mb(cli_args(large, ckpt, work / "rss_large.tif", a))
            result.update(
                rss_sizes=a.rss_sizes,
                rss_small_mb=round(rss_small, 1),
                rss_large_mb=round(rss_large, 1),
                ratio_rss_large_vs_small=round(rss_large / rss_small, 3),
            )
    print(json.dumps(result))


def throughput_and_seams(a: argparse.Namespace, work: Path, ckpt: Path) -> dict[str, object]:
    """CLI vs model-only Mpx/s, interleaved (A B A B) so machine noise hits both alike; then the seam ratio
    of the CLI's map, and of unblended tiles for reference."""
    scene = make_scene(work / "scene.tif", a.size)
    out = work / "chm.tif"
    argv = cli_args(scene, ckpt, out, a)
    run_model, net, _, image, grid = model_only(
        ckpt, scene, a.tile, a.overlap, a.batch_size, a.device, a.precision
    )
    warm = make_scene(work / "warm.tif", a.tile)
    quiet_cli(cli_args(warm, ckpt, work / "warm_chm.tif", a))  # imports, allocator, GDAL drivers
    run_model()
    times: dict[str, list[float]] = {"cli": [], "model": []}
    for _ in range(a.repeats):
        for name, fn in (("cli", lambda: quiet_cli(argv)), ("model", run_model)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    mpx = a.size * a.size / 1e6
    cli_rate, model_rate = mpx / float(np.median(times["cli"])), mpx / float(np.median(times["model"]))

    with rasterio.open(out) as ds:
        heights = ds.read(1)
    crop = image[:, : min(a.size, 4 * a.tile), : min(a.size, 4 * a.tile)]
    hard = predict_image(net, crop, tile=a.tile, overlap=0, batch_size=a.batch_size, device=a.device)
    return {
        "size": a.size,
        "tiles": len(grid),
        "cli_mpx_s": round(cli_rate, 4),
        "model_only_mpx_s": round(model_rate, 4),
        "ratio_cli_vs_model": round(cli_rate / model_rate, 3),
        "seam_ratio": round(seam_ratio(heights, grid), 3),
        "seam_ratio_unblended": round(seam_ratio(hard, TileGrid(*crop.shape[1:], a.tile, 0)), 3),
    }


if __name__ == "__main__":
    main()
