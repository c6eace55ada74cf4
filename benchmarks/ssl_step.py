"""One full DINOv2 training step divided by the bare timm ViT doing the same work, same process and dtype.

Ours: the engine's ``train_step`` (teacher forward on the 2 global crops, student forward+backward on all
crops with iBOT masks, DINO/iBOT heads and losses, KoLeo, clipping, AdamW, EMA update).
Baseline: timm ``VisionTransformer`` of the same shape: student forward+backward on all crops (crops of one
size concatenated, as ours) and teacher forward on the global crops under ``no_grad``.

    python benchmarks/ssl_step.py                       # ViT-S/14, 224/98 px, 2+8 crops, batch 8, CPU fp32
    python benchmarks/ssl_step.py --arch vit_base --batch 64 --device cuda --dtype bf16

Model FLOP utilisation (``mfu``): the step's matmul/attention FLOPs, counted once by PyTorch's
``FlopCounterMode`` (forward and backward, teacher and heads included), per second of a step, over the device's
dense peak for the dtype (``--peak-tflops``; known for H100/H200/A100 in bf16, none on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median  # noqa: E402

from foundation.config import load_config  # noqa: E402
from foundation.models.vit import ARCHS  # noqa: E402
from foundation.train.distributed import DistInfo  # noqa: E402
from foundation.train.engine import Trainer, ssl_setup  # noqa: E402

# Dense bf16 peaks (TFLOP/s, no sparsity) from the vendor's data sheets, matched on the device name.
_BF16_PEAKS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak for ``dtype``, when known (bf16 on the GPUs above); None otherwise."""
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _BF16_PEAKS.items() if key in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="per-process batch")
    ap.add_argument("--prototypes", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tmp", default="/tmp/foundation-bench")
    ap.add_argument(
        "--peak-tflops", type=float, help="dense peak of the device in --dtype (default: known GPUs)"
    )
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # tiny baseline gradients must not hit slow denormal paths
    cfg = load_config(
        None,
        [
            f"model.arch={args.arch}",
            f"model.patch_size={args.patch}",
            f"model.img_size={args.global_size}",
            "model.reg_tokens=4",
            f"ssl.head_prototypes={args.prototypes}",
            f"data.crops.global_size={args.global_size}",
            f"data.crops.local_size={args.local_size}",
            f"data.crops.n_local={args.n_local}",
            f"train.batch_size={args.batch}",
            f"train.precision={args.dtype}",
            "train.steps=1000",
            "optim.warmup_steps=10",
            "optim.freeze_last_layer_steps=0",
            "data.num_workers=0",
        ],
    )
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(args.tmp), DistInfo(0, 1, 0, device), ssl_setup(cfg), quiet=True)
    b, c = args.batch, 3
    g = torch.randn(2 * b, c, args.global_size, args.global_size, device=device)
    loc = torch.randn(args.n_local * b, c, args.local_size, args.local_size, device=device)
    n = (args.global_size // args.patch) ** 2
    masks = torch.zeros(2 * b, n, dtype=torch.bool, device=device)
    masks[:b, : int(0.3 * n)] = True  # half the global crops masked at the mean iBOT ratio
    batch = {"global_crops": g, "local_crops": loc, "masks": masks}

    def ours() -> None:
        trainer.train_step(10, iter([batch]))

    embed_dim, depth, heads = ARCHS[args.arch]
    kwargs = dict(
        img_size=args.global_size,
        patch_size=args.patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        reg_tokens=4,
        no_embed_class=True,
        dynamic_img_size=True,
        num_classes=0,
        init_values=1e-5,
    )
    student = timm.models.vision_transformer.VisionTransformer(**kwargs).to(device)
    teacher = timm.models.vision_transformer.VisionTransformer(**kwargs).to(device).requires_grad_(False)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def bare() -> None:
        with amp:
            with torch.no_grad():
                teacher.forward_features(g)
            loss = student.forward_features(g).float().mean() + student.forward_features(loc).float().mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        ours()
    step_flops = counter.get_total_flops()
    peak = args.peak_tflops or peak_tflops(device, args.dtype)

    times = interleaved_median(
        {"ours": lambda: (ours(), sync()), "bare": lambda: (bare(), sync())}, args.repeats
    )
    images = b
    print(
        json.dumps(
            {
                "benchmark": "ssl_step",
                "arch": args.arch,
                "device": str(device),
                "dtype": args.dtype,
                "batch": b,
                "ours_s": round(times["ours"], 4),
                "bare_s": round(times["bare"], 4),
                "ratio": round(times["ours"] / times["bare"], 3),
                "img_s": round(images / times["ours"], 2),
                "step_tflop": round(step_flops / 1e12, 4),
                "tflops": round(step_flops / times["ours"] / 1e12, 3),
                "peak_tflops": peak,
                "mfu": round(step_flops / times["ours"] / 1e12 / peak, 4) if peak else None,
            }
        )
    )


if __name__ == "__main__":
    main()
