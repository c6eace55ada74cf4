"""Shared fixtures: a tiny recipe and a small image folder, both written on the fly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from domains.images.sample import make_sample_images

TINY_RECIPE = """\
seed: 0
model: {arch: vit_tiny, patch_size: 8, img_size: 32}
ssl:
  head_prototypes: 128
  head_hidden_dim: 64
  head_bottleneck_dim: 32
  teacher_temp_warmup_steps: 4
data:
  num_workers: 0
  crops: {global_size: 32, local_size: 16, n_local: 2}
optim: {lr: 0.001, lr_scaling: none, warmup_steps: 2, freeze_last_layer_steps: 2}
train: {steps: 6, batch_size: 8, checkpoint_every: 2, log_every: 1}
"""


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 8 small PNGs each."""
    return make_sample_images(tmp_path_factory.mktemp("images") / "data", per_class=8, size=40)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models are faster (and bitwise reproducible) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_recipe_text() -> str:
    return TINY_RECIPE


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded samples go to a temporary cache, never the user's home."""
    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
