"""What monitoring costs a pretraining run, measured in one process (interleaved, so machine noise hits both).

1. Per step: a DINOv2 training step with the collapse indicators (teacher entropy, max probability, CLS
   effective rank; computed every step) and the collapse watch, against the same step with the indicators
   replaced by nothing; and the indicators alone on tensors of the step's shapes, as a fraction of the step
   (the steps' own noise on a shared machine is larger than the difference). Goal: overhead <= 3 %.
2. The kNN pass of ``eval.knn`` (features of the train and val folders, the kNN vote) against one embedding
   pass over the same images (``extract_features`` alone). Goal: <= 2x. The PCA picture is timed apart.

    python benchmarks/monitoring.py                          # ViT-tiny/8, 32 px, batch 32, 1,000 images, CPU
    python benchmarks/monitoring.py --arch vit_small --patch 16 --size 224 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median  # noqa: E402

import foundation.ssl.dinov2 as dinov2  # noqa: E402
from foundation.config import load_config  # noqa: E402
from foundation.eval.features import extract_features  # noqa: E402
from foundation.train.distributed import DistInfo  # noqa: E402
from foundation.train.engine import Trainer, ssl_setup  # noqa: E402
from foundation_domains.images.sample import make_sample_images  # noqa: E402


class _NoIndicators:
    """Stands in for ``TeacherIndicators`` in the 'off' arm: measures nothing, reports nothing."""

    @staticmethod
    def measure(*_: object) -> _NoIndicators:
        return _NoIndicators()

    def as_metrics(self) -> dict[str, float]:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=1000, help="kNN train + val images")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)

    with tempfile.TemporaryDirectory(prefix="foundation-monitoring-") as tmp:
        root = Path(tmp)
        per_class = args.images // 2 // 3
        train = make_sample_images(root / "train", per_class=per_class, size=args.size, seed=0)
        val = make_sample_images(root / "val", per_class=per_class, size=args.size, seed=1)
        cfg = load_config(
            "images/small_dinov2",
            [
                f"model.arch={args.arch}",
                f"model.patch_size={args.patch}",
                f"model.img_size={args.size}",
                f"data.crops.global_size={args.size}",
                f"data.crops.local_size={args.size // 2}",
                f"train.batch_size={args.batch}",
                f"data.path={train}",
                "data.num_workers=0",
                f"eval.knn.train={train}",
                f"eval.knn.val={val}",
            ],
        )
        (root / "run").mkdir()
        trainer = Trainer(cfg, root / "run", DistInfo(0, 1, 0, device), ssl_setup(cfg), quiet=True)
        batch = next(trainer.batches())
        monitor = trainer.setup.monitor
        real = dinov2.TeacherIndicators

        def step(indicators: type) -> None:
            dinov2.TeacherIndicators = indicators
            try:
                metrics = trainer.train_step(200, iter([batch]))
                trainer.collapse.update(200, metrics)
            finally:
                dinov2.TeacherIndicators = real

        steps = interleaved_median(
            {"on": lambda: step(real), "off": lambda: step(_NoIndicators)}, args.repeats, warmup=2
        )

        # the indicators alone, on tensors of this step's shapes: a figure machine noise cannot swamp
        k, e = cfg.ssl.head_prototypes, trainer.objective.export_backbone().embed_dim
        probs = torch.softmax(torch.randn(2 * args.batch, k, device=device), dim=-1)
        cls_features = torch.randn(2 * args.batch, e, device=device)
        alone = interleaved_median({"measure": lambda: real.measure(probs, cls_features)}, 50, warmup=3)

        backbone = trainer.objective.export_backbone()
        images_on = cfg.eval.images
        monitor.cfg.eval.images = False  # the kNN pass alone; the picture is timed below

        def knn_pass() -> None:
            monitor.evaluate(backbone, device, 0, root / "run")

        def embedding_pass() -> None:
            extract_features(backbone, monitor.knn.train, device=device)
            extract_features(backbone, monitor.knn.val, device=device)

        passes = interleaved_median({"knn": knn_pass, "embed": embedding_pass}, max(3, args.repeats // 2))
        monitor.cfg.eval.images = images_on
        t = time.perf_counter()
        monitor._pca(backbone, device, 0, root / "run")
        picture_s = time.perf_counter() - t
        n_images = len(monitor.knn.train) + len(monitor.knn.val)

    print(
        json.dumps(
            {
                "benchmark": "monitoring",
                "arch": args.arch,
                "device": str(device),
                "batch": args.batch,
                "step_on_s": round(steps["on"], 4),
                "step_off_s": round(steps["off"], 4),
                "step_overhead": round(steps["on"] / steps["off"] - 1, 4),
                "indicators_s": round(alone["measure"], 5),
                "indicators_vs_step": round(alone["measure"] / steps["off"], 4),
                "knn_images": n_images,
                "knn_pass_s": round(passes["knn"], 3),
                "embedding_pass_s": round(passes["embed"], 3),
                "knn_vs_embedding": round(passes["knn"] / passes["embed"], 3),
                "pca_picture_s": round(picture_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
