"""One 3D MAE training step (96^3 crops, cubic 16^3 patches) divided by the bare encoder + decoder work.

Target (issue 7): at most 1.15. A thin entry to the 3D case of ``mae_step.py``, which holds both sides of the
comparison (the engine's ``train_step`` with the MAE objective vs timm blocks doing the same matmuls).

    python benchmarks/mae3d_step.py                           # ViT-B, batch 8, CPU fp32
    python benchmarks/mae3d_step.py --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mae_step  # noqa: E402

from foundation.models.vit import ARCHS  # noqa: E402

TARGET = 1.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base", choices=sorted(ARCHS))
    ap.add_argument("--size", type=int, default=96, help="crop side (a multiple of 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tmp", default="/tmp/foundation-bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    result = mae_step.run(args, dims=3, size=args.size, patch=16, chans=1)
    result.update(benchmark="mae3d_step", target_max=TARGET, ok=result["ratio"] <= TARGET)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
