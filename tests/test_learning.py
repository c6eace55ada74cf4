"""Learning checks on real images shipped in an installed package (scikit-learn's handwritten digits):
a short pretraining must beat the same architecture at random initialisation, by a margin that is not noise.

Both run the shipped small recipes with their own settings, shortened (their schedules follow the step count):
DINOv2 for 300 steps (about 1.5 minutes on 2 idle CPU cores), MAE for 1,000 (about 4 minutes; on digits MAE sits on a
loss plateau, its features no better than random ones, for its first few hundred steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.cli import main
from foundation.config import RECIPES, load_config
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain

sklearn_datasets = pytest.importorskip("sklearn.datasets")

SMALL_DINOV2 = RECIPES / "images" / "small_dinov2.yaml"
SMALL_MAE = RECIPES / "images" / "small_mae.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 8x8 digits, upscaled to 32 px RGB PNGs; every 5th image is validation."""
    data = sklearn_datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i, (image, label) in enumerate(zip(data.images, data.target, strict=True)):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def _fixed_thread_count(monkeypatch):
    """Two intra-op threads throughout, no thread tuner: its timing-dependent choices change the last bits, and a
    1,000-step MAE run is chaotic in them (same seed, linear top-1 0.825 on 1 thread, 0.867 on 2, 0.842 and 0.881
    under the tuner), so the check would judge the machine's load rather than the objective."""
    monkeypatch.setenv("FOUNDATION_THREADS", "2")


def _evaluate(protocol: str, run: Path, digits: Path, capsys, *extra: str) -> float:
    args = ["evaluate", protocol, "--backbone", str(run), "--data", str(digits / "train")]
    assert main([*args, "--val-data", str(digits / "val"), "--quiet", *extra]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["top1"]


def _knn(run: Path, digits: Path, capsys, *extra: str) -> float:
    return _evaluate("knn", run, digits, capsys, *extra)


def test_dinov2_pretraining_beats_random_init(digits, tmp_path, capsys):
    """The shipped small recipe as it is, shortened to 300 steps (its schedules follow the step count): the
    teacher's targets stay sharp (no uniform collapse) and kNN beats the same ViT at random init."""
    torch.set_num_threads(2)
    cfg = load_config(
        SMALL_DINOV2, [f"data.path={digits / 'train'}", "train.steps=300", "data.num_workers=0"]
    )
    pretrain(cfg, tmp_path / "run", DistInfo(0, 1, 0, torch.device("cpu")), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "teacher_entropy" in r][-10:]
    entropy = sum(r["teacher_entropy"] for r in last) / len(last)
    # uniform collapse sits at ln K = 5.55 (0.95 ln K = 5.27 is the collapse line)
    print(f"teacher entropy over the last 10 logged steps: {entropy:.2f} of ln K {last[-1]['ln_k']:.2f}")
    assert entropy < 0.8 * last[-1]["ln_k"], entropy
    assert not any("collapse_warning" in r for r in rows)
    trained = _knn(tmp_path / "run", digits, capsys)
    random = _knn(tmp_path / "run", digits, capsys, "--random-init")
    print(f"kNN top-1: pretrained {trained:.3f}, random init {random:.3f}")
    # measured 0.561 vs 0.425 at 300 steps (0.77-0.81 at the recipe's 2,000, seeds 0-2)
    assert trained > random + 0.04, (trained, random)


def test_mae_pretraining_beats_random_init(digits, tmp_path, capsys):
    """The shipped small MAE recipe as it is, shortened to 1,000 steps: the loss leaves MAE's plateau and kNN beats
    the same ViT at random init by a margin far outside run-to-run spread."""
    torch.set_num_threads(2)
    cfg = load_config(SMALL_MAE, [f"data.path={digits / 'train'}", "train.steps=1000", "data.num_workers=0"])
    pretrain(cfg, tmp_path / "run", DistInfo(0, 1, 0, torch.device("cpu")), quiet=True)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # norm_pix_loss: predicting each patch's mean scores ~1.0; off the plateau the loss is ~0.5
    assert losses[-1] < 0.6, losses[-5:]
    trained = _knn(tmp_path / "run", digits, capsys)
    random = _knn(tmp_path / "run", digits, capsys, "--random-init")
    print(f"kNN top-1: pretrained {trained:.3f}, random init {random:.3f}")
    # measured 0.700 vs 0.486 (three quarters masked, before: 0.672 and 0.653). kNN, not the linear probe: a
    # random ViT's CLS is already a strong linear feature of digits (0.864), and single 1,000-step runs moved the
    # linear gain by several points across thread schedules (0.825-0.881).
    assert trained > random + 0.08, (trained, random)
