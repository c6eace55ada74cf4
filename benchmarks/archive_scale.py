"""Does start-up grow with the archive? ``pretrain`` and ``embed`` on 100 and on 10,000 slides.

The archives are symbolic links to a few small real slides (JPEG pyramids written here), laid out as an
archive is (``case_XXX/slide_XXXXX.svs``, 100 slides a folder), given either as the folder or as a list file
(``.txt``, one relative path a line). Each command runs as the user runs it (``python -m foundation ...``), in a
fresh subprocess, interleaved 100 / 10,000 / 100 / ... so machine noise hits both alike; medians are reported
(and, for time, the ratio of the fastest runs, the least disturbed on a shared machine).

What is measured, per command and archive size:
- ``pretrain --domain pathology --data ARCHIVE --config pathology/tiny train.steps=1 data.num_workers=0``:
  the time until the first step's line is in ``metrics.jsonl`` (start-up: imports, listing, sample source,
  model; then one step), polled every 20 ms (the final checkpoint and export after it are not counted: a
  constant tail would pull the ratio towards 1), and the peak RSS of the whole command (``wait4``).
- ``embed --domain pathology --data ARCHIVE --num-workers 0``: the time until the FIRST slide's feature file is
  written (listing, output names, planning, backbone, that slide's tiles), polled every 20 ms, and the peak RSS
  up to then (``VmHWM``); the command is then stopped (SIGKILL): embedding 10,000 slides whole measures
  slides, not start-up. A killed run leaves only its hidden temporary (removed by the next run).

Target: ratio 10,000 / 100 <= 1.2 for time and for peak RSS, both commands, both ways of giving the archive.

    python benchmarks/archive_scale.py                 # about 6 minutes on 2 CPU cores
    python benchmarks/archive_scale.py --repeats 1 --sizes 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology.sample import synthetic_he, write_pyramid_tiff

DESCRIPTION = "Aperio Image Library v12.0.0 \r\n{w}x{h} (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.25"
REPO = Path(__file__).resolve().parents[1]
BACKBONE = dict(arch="vit_tiny", in_chans=3, spatial_dims=2, img_size=64, patch_size=16, reg_tokens=0)


def make_real_slides(root: Path, count: int, width: int, height: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = root / f"real_{k}.svs"
        if not path.is_file():
            write_pyramid_tiff(
                path, synthetic_he(width, height, seed=k), DESCRIPTION.format(w=width, h=height)
            )
        paths.append(path)
    return paths


def make_archive(root: Path, n: int, real: list[Path]) -> tuple[Path, Path]:
    """``root/`` with ``n`` links to the real slides, and ``root.txt`` listing them (relative paths)."""
    listing = root.with_suffix(".txt")
    if listing.is_file():
        return root, listing
    lines = []
    for i in range(n):
        rel = Path(f"case_{i // 100:03d}") / f"slide_{i:05d}.svs"
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        os.symlink(real[i % len(real)], root / rel)
        lines.append(f"{root.name}/{rel}\n")
    listing.write_text("".join(lines))
    return root, listing


def _vmhwm_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def run_pretrain(data: Path, out: Path) -> dict[str, float]:
    argv = [sys.executable, "-m", "foundation", "pretrain", "--domain", "pathology", "--data", str(data)]
    argv += ["--config", "pathology/tiny", "--out", str(out), "--quiet"]
    argv += ["train.steps=1", "train.checkpoint_every=1", "data.num_workers=0"]
    metrics = out / "metrics.jsonl"  # its first line is written when the first step ends
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe nobody reads while waiting (it could fill)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        seconds = float("nan")
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if seconds != seconds and metrics.is_file() and metrics.stat().st_size > 0:
                seconds = time.perf_counter() - t0
            if pid:
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or seconds != seconds:
            stderr.seek(0)
            text = stderr.read().decode(errors="replace")[-2000:]
            raise SystemExit(
                f"pretrain failed ({proc.returncode}, first step logged: {seconds == seconds}): {text}"
            )
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_embed(data: Path, backbone: Path, out: Path) -> dict[str, float]:
    argv = [sys.executable, "-m", "foundation", "embed", "--domain", "pathology", "--data", str(data)]
    argv += ["--backbone", str(backbone), "--out", str(out), "--num-workers", "0", "--batch-size", "32"]
    argv += ["--quiet", "data.options.mpp=1.0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    try:
        while True:
            peak = max(peak, _vmhwm_mib(proc.pid))
            if out.is_dir() and any(p.suffix == ".h5" and not p.name.startswith(".") for p in out.iterdir()):
                seconds = time.perf_counter() - t0
                peak = max(peak, _vmhwm_mib(proc.pid))
                break
            if proc.poll() is not None:
                raise SystemExit(f"embed ended ({proc.returncode}) before writing a feature file")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"seconds": seconds, "peak_rss_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=(100, 10_000))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--real-slides", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(2048, 1536), help="real slide width height")
    ap.add_argument("--work", type=Path, help="keep archives here (default: a temporary folder)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="foundation-archive-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    real = make_real_slides(work / "real", a.real_slides, *a.size)
    archives = {n: make_archive(work / f"archive_{n}", n, real) for n in a.sizes}
    backbone = work / "backbone"
    if not (backbone / "config.json").is_file():
        export_backbone(build_vit(**BACKBONE), BACKBONE, backbone, mean=(0.5,) * 3, std=(0.5,) * 3)

    (work / "runs").mkdir(exist_ok=True)
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    for _ in range(a.repeats):
        for n in a.sizes:
            folder, listing = archives[n]
            for how, data in (("folder", folder), ("list", listing)):
                runs = Path(tempfile.mkdtemp(prefix=f"{n}-{how}-", dir=work / "runs"))  # fresh outputs
                pre = run_pretrain(data, runs / "pretrain")
                emb = run_embed(data, backbone, runs / "embed")
                shutil.rmtree(runs)  # ours: checkpoints and feature files of this run
                results.setdefault(f"pretrain_{how}", {}).setdefault(n, []).append(pre)
                results.setdefault(f"embed_{how}", {}).setdefault(n, []).append(emb)
                print(f"{n:>6} slides, {how:6}: pretrain {pre}  embed {emb}", file=sys.stderr)

    small, large = a.sizes
    report: dict[str, dict[str, float]] = {}
    for name, by_size in results.items():
        med = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in by_size.items()}
        fastest = {n: min(r["seconds"] for r in runs) for n, runs in by_size.items()}
        report[name] = {
            f"seconds_{small}": round(med[small]["seconds"], 2),
            f"seconds_{large}": round(med[large]["seconds"], 2),
            "time_ratio": round(med[large]["seconds"] / med[small]["seconds"], 3),
            # the fastest run of each: the least disturbed by other work on a shared machine
            "time_ratio_of_fastest": round(fastest[large] / fastest[small], 3),
            f"peak_rss_mib_{small}": round(med[small]["peak_rss_mib"], 1),
            f"peak_rss_mib_{large}": round(med[large]["peak_rss_mib"], 1),
            "rss_ratio": round(med[large]["peak_rss_mib"] / med[small]["peak_rss_mib"], 3),
        }
    ok = all(r["time_ratio"] <= 1.2 and r["rss_ratio"] <= 1.2 for r in report.values())
    print(
        json.dumps(
            {"sizes": list(a.sizes), "repeats": a.repeats, "results": report, "target_met": ok}, indent=2
        )
    )


if __name__ == "__main__":
    main()
