"""``foundation segment`` inference: throughput against MONAI's ``sliding_window_inference``, and peak memory.

1. Throughput (target: ratio >= 0.9). The same network, ROI, overlap, Gaussian blending, window batch and
   precision on the same preloaded, preprocessed tensor. Ours: ``Segmenter.predict`` (sliding window, argmax,
   labels to the CPU). Baseline: ``monai.inferers.sliding_window_inference`` + ``argmax``. Interleaved medians in
   one process, in both orders (mean of the two medians). ``full`` adds our nearest-neighbour resampling of the labels back onto a CT grid (reported, not
   part of the ratio: MONAI has no counterpart on a bare tensor).
2. Peak memory of the whole command, ``foundation segment CT.nii --checkpoint ... --out ...``, in a subprocess
   (peak RSS; peak CUDA memory too on a GPU), on a synthetic CT written as NIfTI. Default a CT that runs in a few
   minutes on a CPU; ``--big`` is 512 x 512 x 300 at 0.75 x 0.75 x 1 mm.

    python benchmarks/medical_infer.py                                  # CPU: vit_tiny, ROI 64
    python benchmarks/medical_infer.py --device cuda --arch vit_base --roi 96 --big
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median  # noqa: E402

from foundation.models.vit import ARCHS, build_vit  # noqa: E402
from foundation.tasks.checkpoint import save_task_model  # noqa: E402
from foundation_domains.medical.segmentation.infer import Segmenter, nearest_to_grid  # noqa: E402
from foundation_domains.medical.segmentation.meta import SegmentationMeta  # noqa: E402
from foundation_domains.medical.segmentation.model import build_segmentation_net  # noqa: E402

TARGET = 0.9
BTCV = [
    "background",
    "spleen",
    "kidney_r",
    "kidney_l",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
]
BTCV += ["ivc", "portal_vein", "pancreas", "adrenal_r", "adrenal_l"]
CHILD = (
    "import json, sys, torch\n"
    "from foundation.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
    "print('CUDA_PEAK ' + json.dumps(peak), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def task_meta(args: argparse.Namespace) -> SegmentationMeta:
    return SegmentationMeta(
        head={"out_channels": len(BTCV), "feature_size": 16},
        in_chans=1,
        roi_size=(args.roi,) * 3,
        num_classes=len(BTCV),
        labels={name: i for i, name in enumerate(BTCV)},
        spacing=(1.5, 1.5, 2.0),
        modality="ct",
        window=(-175.0, 250.0),
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
    )


def throughput(args: argparse.Namespace, net: torch.nn.Module, meta: SegmentationMeta) -> dict:
    from monai.inferers import sliding_window_inference

    device = torch.device(args.device)
    seg = Segmenter(net, meta, device, precision=args.precision)
    image = torch.rand(1, *args.size)  # preprocessed (1.5 x 1.5 x 2 mm) CT in [0, 1], preloaded on the CPU
    grid_affine = np.diag([0.75, 0.75, 1.0, 1.0])  # the CT it came from, twice as fine
    grid_shape = [int(s * f) for s, f in zip(args.size, (2, 2, 2), strict=True)]
    pred_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    amp = seg.amp_dtype is not None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        seg.predict(image)
        sync()

    def full() -> None:
        nearest_to_grid(seg.predict(image), pred_affine, grid_affine, grid_shape)
        sync()

    def monai_swi() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=seg.amp_dtype or torch.float32, enabled=amp),
        ):
            out = sliding_window_inference(
                image[None].to(device),
                roi_size=list(meta.roi_size),
                sw_batch_size=meta.sw_batch_size,
                predictor=net,
                overlap=meta.overlap,
                mode="gaussian",
            )
            out.argmax(1).to("cpu", torch.uint8)
        sync()

    # both orders, so a slow first (or last) slot of each round hits ours and the baseline alike
    fns = {"ours": ours, "monai": monai_swi, "full": full}
    forward = interleaved_median(fns, args.repeats)
    backward = interleaved_median(dict(reversed(fns.items())), args.repeats, warmup=0)
    t = {k: (forward[k] + backward[k]) / 2 for k in fns}
    voxels = float(np.prod(args.size))
    return {
        "benchmark": "medical_infer",
        "device": str(device),
        "arch": args.arch,
        "precision": args.precision,
        "roi": args.roi,
        "overlap": args.overlap,
        "sw_batch_size": args.sw_batch_size,
        "volume": list(args.size),
        "ours_s": round(t["ours"], 4),
        "monai_s": round(t["monai"], 4),
        "full_s": round(t["full"], 4),
        "ratio": round(t["monai"] / t["ours"], 3),  # throughput ours / throughput MONAI
        "target_min": TARGET,
        "ok": t["monai"] / t["ours"] >= TARGET,
        "mvoxels_s": round(voxels / t["ours"] / 1e6, 3),
    }


def peak_memory(
    args: argparse.Namespace, net: torch.nn.Module, meta: SegmentationMeta, backbone_args: dict
) -> dict:
    """Run ``foundation segment`` on a synthetic CT in a subprocess; its peak RSS from ``wait4``."""
    shape = (512, 512, 300) if args.big else tuple(args.ct)
    spacing = (0.75, 0.75, 1.0) if args.big else (1.5, 1.5, 2.5)
    with tempfile.TemporaryDirectory(prefix="foundation-bench-") as tmp:
        root = Path(tmp)
        ckpt = save_task_model(
            root / "model.pt",
            task="organ-segmentation",
            task_meta=meta.to_dict(),
            backbone_args=backbone_args,
            net=net,
            config={},
            step=0,
        )
        rng = np.random.default_rng(0)
        hu = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS, as CT converted from DICOM
        nib.save(nib.Nifti1Image(hu, affine), root / "ct.nii")
        del hu
        cmd = [sys.executable, "-c", CHILD, "segment", str(root / "ct.nii"), "--checkpoint", str(ckpt)]
        cmd += ["--out", str(root / "seg"), "--quiet", "--device", "cuda" if args.device == "cuda" else "cpu"]
        cmd += ["--precision", args.precision, "--stitch", args.stitch]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err = proc.stderr.read() if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"foundation segment failed:\n{err[-3000:]}")
        cuda_peak = int(
            next((line.split()[1] for line in err.splitlines() if line.startswith("CUDA_PEAK ")), 0)
        )
        out = nib.load(root / "seg" / "ct_seg.nii.gz")
        if out.shape != shape or not np.allclose(out.affine, affine):
            raise SystemExit(f"segment output {out.shape} does not match the input {shape}")
    mib = 1024**2
    return {
        "benchmark": "medical_infer_peak_memory",
        "ct": list(shape),
        "ct_spacing_mm": list(spacing),
        "device": args.device,
        "stitch": args.stitch,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss * 1024 / mib),  # Linux reports KiB
        "peak_cuda_mib": round(cuda_peak / mib),
        "ct_float32_mib": round(np.prod(shape) * 4 / mib),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny", choices=sorted(ARCHS))
    ap.add_argument("--roi", type=int, default=64, help="ROI side (a multiple of 16)")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--sw-batch-size", type=int, default=2)
    ap.add_argument(
        "--size", type=int, nargs=3, default=[128, 128, 96], help="preprocessed volume (throughput)"
    )
    ap.add_argument(
        "--ct", type=int, nargs=3, default=[192, 192, 80], help="CT of the memory run (1.5x1.5x2.5mm)"
    )
    ap.add_argument(
        "--big", action="store_true", help="memory run on a 512 x 512 x 300 CT (0.75 x 0.75 x 1 mm)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--stitch", default="auto", choices=["auto", "cpu", "device"])
    ap.add_argument("--only", choices=["throughput", "memory"])
    args = ap.parse_args()
    torch.manual_seed(0)
    backbone_args = {
        "arch": args.arch,
        "in_chans": 1,
        "spatial_dims": 3,
        "img_size": args.roi,
        "patch_size": 16,
    }
    meta = task_meta(args)
    net = build_segmentation_net(build_vit(**backbone_args), meta.head).eval()
    if args.only != "memory":
        print(json.dumps(throughput(args, net.to(args.device), meta)), flush=True)
    if args.only != "throughput":
        print(json.dumps(peak_memory(args, net.cpu(), meta, backbone_args)), flush=True)


if __name__ == "__main__":
    main()
