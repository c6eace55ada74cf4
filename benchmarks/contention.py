"""CPU speed on a shared machine: each command alone, beside one busy core, and two copies at once.

For every command (``pretrain``, ``embed``, ``segment``, ``canopy-height``) the whole CLI runs in a subprocess on a
fixed workload, with our thread sizing (the default) and with the libraries' own settings
(``FOUNDATION_THREADS=off``, what every command did before ``foundation/threads.py``), interleaved so that
machine noise hits both alike. Printed per command, as ratios:

* ``alone``: the libraries' settings' wall time over ours, alone (target >= 0.95: no slower than before);
* ``busy``: our wall time beside one process that keeps one core busy, over ours alone (target <= 1.3);
* ``pair``: two copies started together, the wall time until both finish, over two run one after the other
  (target <= 1.0);
* ``late``: our wall time when the busy process starts halfway through, over ours alone (no target: it shows
  whether a run that started alone gives the core back; ``pretrain``'s thread tuner should).

The same ratios with the libraries' settings are printed for comparison.

    python benchmarks/contention.py                       # all four commands, about 20 minutes on 2 cores
    python benchmarks/contention.py --commands pretrain --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from canopy_map import make_checkpoint, make_scene  # noqa: E402

from foundation.models.vit import build_vit  # noqa: E402
from foundation.tasks.checkpoint import save_task_model  # noqa: E402
from foundation_domains.medical.segmentation.model import build_segmentation_net  # noqa: E402

BUSY = "while True: pass"
TARGETS = {"alone": 0.95, "busy": 1.3, "pair": 1.0}


def _env(mode: str) -> dict[str, str]:
    omp = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in omp}
    env.pop("FOUNDATION_THREADS", None)
    if mode == "libraries":
        env["FOUNDATION_THREADS"] = "off"
    return env


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "foundation", *argv]


def workloads(work: Path, steps: int) -> dict[str, list[str]]:
    """One command line per command; ``{out}`` is replaced by a fresh output path per run."""
    images = work / "images"
    rng = np.random.default_rng(0)
    for i in range(64):
        (images / str(i % 4)).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / str(i % 4) / f"{i:03d}.png")
    pretrain = ["pretrain", "--domain", "images", "--data", str(images), "--quiet", "--out", "{out}"]
    pretrain += [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    backbone = work / "backbone"
    subprocess.run(
        _cli([*pretrain[:-4], "--out", str(backbone), "train.steps=1"]), check=True, env=_env("ours")
    )

    torch.manual_seed(0)
    seg_args = {"arch": "vit_tiny", "in_chans": 1, "spatial_dims": 3, "img_size": 64, "patch_size": 16}
    head = {"out_channels": 4, "feature_size": 16}
    meta = {
        "head": head,
        "in_chans": 1,
        "roi_size": [64, 64, 64],
        "spacing": [1.5, 1.5, 2.0],
        "modality": "ct",
        "window": [-175.0, 250.0],
        "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3},
        "num_classes": 4,
        "overlap": 0.25,
        "sw_batch_size": 2,
    }
    net = build_segmentation_net(build_vit(**seg_args), head).eval()
    seg_ckpt = save_task_model(
        work / "seg.pt",
        task="organ-segmentation",
        task_meta=meta,
        backbone_args=seg_args,
        net=net,
        config={},
        step=0,
    )
    hu = rng.integers(-1000, 1500, size=(160, 160, 64), dtype=np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([-1.5, -1.5, 2.0, 1.0])), work / "ct.nii")
    canopy_ckpt = make_checkpoint(work / "canopy.pt", tile=128, patch=16, features=32)
    scene = make_scene(work / "scene.tif", size=512)
    return {
        "pretrain": pretrain,
        "embed": ["embed", "--backbone", str(backbone), "--data", str(images), "--out", "{out}", "--quiet"],
        "segment": [
            "segment",
            str(work / "ct.nii"),
            "--checkpoint",
            str(seg_ckpt),
            "--out",
            "{out}",
            "--quiet",
        ],
        "canopy-height": [
            "canopy-height",
            str(scene),
            "--checkpoint",
            str(canopy_ckpt),
            "--out",
            "{out}",
            "--quiet",
            "--batch-size",
            "8",
        ],
    }


class Runner:
    def __init__(self, work: Path) -> None:
        self.work, self.count = work, 0
        (work / "out").mkdir(parents=True, exist_ok=True)  # commands refuse an --out whose parent is missing

    def start(self, argv: list[str], mode: str) -> subprocess.Popen:
        self.count += 1
        out = self.work / "out" / f"{self.count:04d}"
        cmd = _cli([a.replace("{out}", str(out)) for a in argv])
        return subprocess.Popen(
            cmd, env=_env(mode), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def wall(
        self, argv: list[str], mode: str, copies: int = 1, busy: bool = False, busy_after: float | None = None
    ) -> float:
        """Wall time of ``copies`` runs started together; ``busy``: one spinning process from the start, or from
        ``busy_after`` seconds into the run."""
        spinner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy and busy_after is None else None
        try:
            time.sleep(0.2 if spinner else 0.0)
            t = time.perf_counter()
            procs = [self.start(argv, mode) for _ in range(copies)]
            if busy_after is not None:
                time.sleep(busy_after)
                spinner = subprocess.Popen([sys.executable, "-c", BUSY])
            for p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    raise SystemExit(f"{' '.join(argv)} failed ({mode}):\n{err[-2000:]}")
            return time.perf_counter() - t
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()


def measure(runner: Runner, argv: list[str], repeats: int) -> dict[str, float]:
    """Median wall times of the four cases per mode, interleaved (A B A B ...) over the repeats. ``late``: the
    busy process starts halfway through the first run alone (a machine that gets busy mid-run), not a target."""
    halfway = runner.wall(argv, "ours") / 2
    cases = {
        (mode, case): kwargs
        for mode in ("ours", "libraries")
        for case, kwargs in (
            ("alone", {}),
            ("busy", {"busy": True}),
            ("late", {"busy": True, "busy_after": halfway}),
            ("pair", {"copies": 2}),
        )
    }
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for (mode, case), kwargs in cases.items():
            times[(mode, case)].append(runner.wall(argv, mode, **kwargs))
    med = {f"{mode}_{case}_s": statistics.median(v) for (mode, case), v in times.items()}
    result = {
        "alone": med["libraries_alone_s"] / med["ours_alone_s"],
        "busy": med["ours_busy_s"] / med["ours_alone_s"],
        "pair": med["ours_pair_s"] / (2 * med["ours_alone_s"]),
        "late": med["ours_late_s"] / med["ours_alone_s"],
        "libraries_busy": med["libraries_busy_s"] / med["libraries_alone_s"],
        "libraries_pair": med["libraries_pair_s"] / (2 * med["libraries_alone_s"]),
        "libraries_late": med["libraries_late_s"] / med["libraries_alone_s"],
    }
    result = {k: round(v, 3) for k, v in result.items()}
    result.update({k: round(v, 2) for k, v in med.items()})
    result["pass"] = (
        result["alone"] >= TARGETS["alone"]
        and result["busy"] <= TARGETS["busy"]
        and result["pair"] <= TARGETS["pair"]
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", nargs="+", default=["pretrain", "embed", "segment", "canopy-height"])
    ap.add_argument("--steps", type=int, default=30, help="pretraining steps per run")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "targets": TARGETS}), flush=True)
    with tempfile.TemporaryDirectory(prefix="foundation-contention-") as tmp:
        work = Path(tmp)
        commands = workloads(work, args.steps)
        runner = Runner(work)
        for name in args.commands:
            print(json.dumps({"command": name, **measure(runner, commands[name], args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
