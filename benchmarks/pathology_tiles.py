"""Tiles/s of the pathology pretraining stream against raw ``OpenSlide.read_region`` of the same tiles.

Ours: ``SSLViewDataset`` over the pathology source (slide pick, tissue tile pick, read + resize, HED stain jitter,
DINOv2 multi-crop views, tensors). Baseline: ``openslide.OpenSlide(path).read_region`` of exactly the regions the
stream read. Then the stream through a DataLoader with 1 and 2 worker processes.

    python benchmarks/pathology_tiles.py                     # embedded sample slide, 0.5 um/px, 224 px tiles
    python benchmarks/pathology_tiles.py --data slides/ --tiles 400
    python benchmarks/pathology_tiles.py --method mae         # one crop per tile (MAE) instead of 2 + 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import openslide
import torch
from torch.utils.data import DataLoader

from foundation.config import load_config
from foundation.data.stream import SSLViewDataset, collate_views
from foundation.domain import get_domain


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="slide folder; default: the embedded sample slide")
    ap.add_argument("--tiles", type=int, default=200)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16, help="loader batch (collated in the workers)")
    ap.add_argument(
        "--method", default="dinov2", choices=["dinov2", "mae"], help="view recipe: 2 + n-local crops, or one"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    domain = get_domain("pathology")
    data = args.data or str(
        domain.make_sample(Path(tempfile.gettempdir()) / "foundation-bench" / "pathology")
    )
    cfg = load_config(
        None,
        [
            f"data.options.mpp={args.mpp}",
            f"data.options.tile_size={args.tile_size}",
            f"data.crops.global_size={args.tile_size}",
            f"data.crops.n_local={args.n_local}",
            f"ssl.method={args.method}",
        ],
        domain="pathology",
    )
    source = domain.sample_source(data, cfg)
    dataset = SSLViewDataset(source, domain.ssl_transform(cfg), seed=0)
    n = args.tiles
    dataset[0]  # warm: tissue masks of the slides this stream touches are planned once per worker

    # Which regions the stream reads, so the baseline reads exactly those.
    regions = []
    for i in range(n):
        s = source.sample(i, torch.Generator().manual_seed(i))
        tiling = source.tiling(Path(s["path"]), s["mpp"])
        regions.append((s["path"], tuple(int(v) for v in s["coords"]), tiling.level, tiling.read_size))
    handles = {p: openslide.OpenSlide(p) for p in {r[0] for r in regions}}

    def raw() -> None:
        for path, xy, level, size in regions:
            handles[path].read_region(xy, level, (size, size))

    def ours() -> None:
        for i in range(n):
            dataset[i]

    def loader(workers: int) -> float:
        # as the engine loads: batches collated in the workers (one transfer per batch, not per crop)
        dl = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=range(n + args.batch_size),
            num_workers=workers,
            prefetch_factor=4,
            collate_fn=collate_views,
            worker_init_fn=_one_thread,
        )
        it = iter(dl)
        next(it)  # worker start-up and per-worker tissue planning are not throughput
        t = time.perf_counter()
        for _ in it:
            pass
        return n / (time.perf_counter() - t)

    raw_rate = _rate(n, raw)
    ours_rate = _rate(n, ours)
    one, two = loader(1), loader(2)
    print(
        json.dumps(
            {
                "benchmark": "pathology_tiles",
                "tiles": n,
                "mpp": args.mpp,
                "tile_size": args.tile_size,
                "method": args.method,
                "raw_read_region_tiles_s": round(raw_rate, 1),
                "stream_tiles_s": round(ours_rate, 1),
                "ratio_stream_vs_raw": round(ours_rate / raw_rate, 3),
                "loader_1_worker_tiles_s": round(one, 1),
                "loader_2_workers_tiles_s": round(two, 1),
                "ratio_2_vs_1_workers": round(two / one, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
