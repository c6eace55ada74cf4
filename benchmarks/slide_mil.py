"""Slide classification: the engine's ABMIL training step vs the bare attention network, and evaluate's memory.

1. Speed: one bag of ``--tiles`` x ``--dim`` features (10,000 x 768 by default) already in memory. Ours is the
   engine's own ``Trainer.train_step`` on the task's network and loss (fold routing, padding mask, class weights,
   gradient clipping, AdamW); the baseline is a plain gated-attention network of the same widths (Linear-ReLU,
   tanh/sigmoid gates, softmax, weighted sum, classifier) doing forward, cross-entropy and backward on the same
   tensor. Interleaved repeats; the ratio of medians is ours/bare in steps/s (target >= 0.9).
2. Memory: ``foundation evaluate slide-classification`` in a child process over ``--slides`` bags and over a tenth
   of them (same bags, linked), peak RSS of each (target: the larger run <= 1.2 x the smaller: bags are read one
   at a time, never all held). The bags are written to ``--work`` (default a temporary folder; 200 bags of
   10,000 x 768 float32 take 6.1 GB: give fewer ``--tiles`` on a small disk).

    python benchmarks/slide_mil.py                              # both parts at the issue's sizes
    python benchmarks/slide_mil.py --tiles 2000 --slides 200    # smaller bags on disk
    python benchmarks/slide_mil.py --skip-memory                # speed only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from foundation.config import RECIPES, load_config
from foundation.tasks.base import TaskModel
from foundation.train.distributed import DistInfo
from foundation.train.engine import Trainer, TrainingSetup
from foundation_domains.pathology.slide_classification.data import collate_bags
from foundation_domains.pathology.slide_classification.loss import SlideLoss
from foundation_domains.pathology.slide_classification.model import HeadConfig, SlideMIL

RECIPE = RECIPES / "pathology" / "slide_mil_tiny.yaml"


class BareABMIL(nn.Module):
    """The gated-attention network alone (Ilse et al. 2018), the same widths as the task's head."""

    def __init__(self, dim: int, hidden: int, attention: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.25))
        self.v, self.u, self.w = (
            nn.Linear(hidden, attention),
            nn.Linear(hidden, attention),
            nn.Linear(attention, 1),
        )
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=-1)
        return self.classifier(torch.bmm(a.unsqueeze(1), h).squeeze(1))


def engine_trainer(dim: int, work: Path) -> tuple[Trainer, HeadConfig]:
    cfg = load_config(RECIPE, ["train.steps=100000", "optim.warmup_steps=0"], pretraining=False)
    opts = cfg.task.options
    head = HeadConfig(dim, 2, "abmil", opts["hidden"], opts["attention_dim"], opts["dropout"])
    net = SlideMIL(head, folds=1)
    loss = SlideLoss(torch.ones(1, 2))
    objective = TaskModel(net, loss, input_key=("features", "mask", "fold"), uses_backbone=False)
    setup = TrainingSetup(
        objective, dataset=None, backbone_args={}, mean=(), std=(), collate=collate_bags,
        checkpoint_meta={"task": "slide-classification"},  # as finetune's: a task run
    )  # fmt: skip
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(cfg, work, dist, setup, quiet=True), head


def speed(tiles: int, dim: int, repeats: int, work: Path) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as run_training does: Adam's tiny moments otherwise take a slow path
    features = torch.randn(tiles, dim)
    trainer, head = engine_trainer(dim, work)
    batch = collate_bags([{"features": features, "label": 1, "fold": 0}])
    bare = BareABMIL(dim, head.hidden, head.attention_dim, 2)
    x, y = features.unsqueeze(0), torch.tensor([1])

    def ours(step: int) -> None:
        trainer.train_step(step, iter([batch]))

    def baseline(step: int) -> None:
        bare.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(bare(x), y).backward()

    for step in range(3):  # warm-up
        ours(step)
        baseline(step)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for step in range(repeats):
        pair = (("ours", ours), ("bare", baseline))
        for name, fn in pair if step % 2 else pair[::-1]:  # alternate who goes first
            tic = time.perf_counter()
            fn(step)
            times[name].append(time.perf_counter() - tic)
    ours_s, bare_s = statistics.median(times["ours"]), statistics.median(times["bare"])
    return {"ours_steps_per_s": 1 / ours_s, "bare_steps_per_s": 1 / bare_s, "ratio": bare_s / ours_s}


def write_cohort(folder: Path, slides: int, tiles: int, dim: int, prefix: str = "e") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.normal(size=(tiles, dim)).astype(np.float32)
    for i in range(slides):
        path = folder / f"{prefix}{i:04d}.h5"
        if path.exists():
            continue
        with h5py.File(path, "w") as f:
            f.create_dataset("coords", data=np.zeros((tiles, 2), np.int64))
            f.create_dataset("features", data=np.roll(block, i, axis=0))
            f.attrs.update({"complete": True, "n_tiles": tiles, "backbone_fingerprint": "bench"})


def peak_rss_mib(argv: list[str]) -> tuple[float, int]:
    """Peak RSS of the command run in a fresh child (its own wrapper, so nothing else counts)."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    kib, code = out.stdout.split()
    return int(kib) / 1024, int(code)


def memory(slides: int, tiles: int, dim: int, work: Path) -> dict[str, float]:
    train, every = work / "train", work / f"eval{slides}"
    small = work / f"eval{max(1, slides // 10)}"
    write_cohort(
        train, 6, 64, dim, prefix="t"
    )  # other names than the cohort's: every fold scores every slide
    (work / "train.csv").write_text("slide_id,label\n" + "".join(f"t{i:04d},{i % 2}\n" for i in range(6)))
    write_cohort(every, slides, tiles, dim)
    small.mkdir(exist_ok=True)
    for i in range(max(1, slides // 10)):
        link = small / f"e{i:04d}.h5"
        if not link.exists():
            link.symlink_to(every / link.name)
    for folder, n in ((every, slides), (small, max(1, slides // 10))):
        (work / f"{folder.name}.csv").write_text(
            "slide_id,label\n" + "".join(f"e{i:04d},{i % 2}\n" for i in range(n))
        )
    run = work / "run"
    if not (run / "model.pt").exists():
        subprocess.run(
            [sys.executable, "-m", "foundation", "finetune", "slide-classification", "--features", str(train),
             "--labels", str(work / "train.csv"), "--out", str(run), "--quiet", "train.steps=2",
             "task.options.folds=2", "task.options.val_fraction=0"],
            check=True, capture_output=True,
        )  # fmt: skip
    result = {}
    for folder in (small, every):
        n = len(list(folder.glob("*.h5")))
        argv = [sys.executable, "-m", "foundation", "evaluate", "slide-classification", "--checkpoint", str(run),
                "--features", str(folder), "--labels", str(work / f"{folder.name}.csv"), "--quiet",
                "--bootstrap", "100", "--out", str(work / f"{folder.name}_predictions.csv")]  # fmt: skip
        tic = time.perf_counter()
        rss, code = peak_rss_mib(argv)
        result[f"peak_rss_mib_{n}_slides"] = rss
        result[f"seconds_{n}_slides"] = time.perf_counter() - tic
        result[f"exit_{n}_slides"] = code
    small_n, big_n = max(1, slides // 10), slides
    result["rss_ratio"] = result[f"peak_rss_mib_{big_n}_slides"] / result[f"peak_rss_mib_{small_n}_slides"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--slides", type=int, default=200)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--work", help="folder for the bags (kept, reused); default: a temporary folder")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report: dict[str, object] = {"tiles": args.tiles, "dim": args.dim, "threads": torch.get_num_threads()}
        report["speed"] = speed(args.tiles, args.dim, args.repeats, work / "speed_run")
        print(json.dumps(report), flush=True)
        if not args.skip_memory:
            report["memory"] = memory(args.slides, args.tiles, args.dim, work)
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
