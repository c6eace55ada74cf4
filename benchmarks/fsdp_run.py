"""``train.parallel=fsdp`` against ``ddp``: the whole ``foundation pretrain`` under torchrun, same recipe and seed.

Both runs train the same steps on the same images; printed: each run's median img/s after the first steps (start-up
and compilation left out), the ratio FSDP/DDP, the largest relative difference of their per-step losses
(fp32: float rounding; bf16: FSDP computes in bf16 weights, DDP in fp32 weights under autocast), and the shard
files of FSDP's last checkpoint. On one GPU FSDP shards over a 1-rank mesh (its mixed precision and sharded
checkpoints run as on many).

    python benchmarks/fsdp_run.py                                        # CPU, vit_tiny, 1 process
    python benchmarks/fsdp_run.py --device cuda --arch vit_base --img-size 224 --batch 64 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from foundation_domains.images.sample import make_sample_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(out: Path, data: Path, parallel: str, a: argparse.Namespace) -> list[dict]:
    """One run; its metrics.jsonl records."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(a.nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "foundation", "pretrain", "--data", str(data), "--out", str(out), "--quiet",
        f"model.arch={a.arch}", f"model.img_size={a.img_size}", f"model.patch_size={a.patch}",
        f"data.crops.global_size={a.img_size}", f"data.crops.local_size={a.img_size // 2}",
        f"data.crops.n_local={a.n_local}", f"data.num_workers={a.workers}",
        f"train.steps={a.steps}", f"train.batch_size={a.batch}", f"train.checkpoint_every={a.steps}",
        "train.log_every=1", f"train.parallel={parallel}", "ssl.koleo_loss_weight=0",
        "--device", a.device,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{parallel} run failed:\n{done.stderr[-4000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--n-local", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", type=Path, help="where images and runs go (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        data = make_sample_images(work / "images", per_class=max(8, a.batch), size=max(40, a.img_size + 8))
        runs = {p: pretrain(work / p, data, p, a) for p in ("ddp", "fsdp")}
        shards = sorted(p.name for p in (work / "fsdp" / "checkpoints" / f"step_{a.steps:08d}").iterdir())
    losses = {p: {r["step"]: r["loss"] for r in recs if "loss" in r} for p, recs in runs.items()}
    skip = min(2, a.steps - 1)  # start-up, allocator warm-up and compilation are not throughput
    rate = {
        p: statistics.median(r["img_s"] for r in recs if "img_s" in r and r["step"] >= skip)
        for p, recs in runs.items()
    }
    diff = max(abs(losses["fsdp"][s] - v) / max(abs(v), 1e-12) for s, v in losses["ddp"].items())
    print(
        json.dumps(
            {
                "benchmark": "fsdp_run",
                "arch": a.arch,
                "device": a.device,
                "nproc": a.nproc,
                "batch": a.batch,
                "img_size": a.img_size,
                "ddp_img_s": round(rate["ddp"], 2),
                "fsdp_img_s": round(rate["fsdp"], 2),
                "ratio_fsdp_vs_ddp": round(rate["fsdp"] / rate["ddp"], 3),
                "max_rel_loss_diff": diff,
                "fsdp_checkpoint_files": shards,
            }
        )
    )


if __name__ == "__main__":
    main()
