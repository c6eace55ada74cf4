"""Shared fixtures: a tiny recipe and a small image folder, both written on the fly."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from foundation_domains.images.sample import make_sample_images

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (skipped without one; benchmarks/gpu_check.sh runs them)"
    )


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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(kib)``: a folder on a tmpfs of that size, so a test meets a real full disk (ENOSPC from
    the kernel, whatever library writes). Skips where this machine does not allow mounting."""
    mounts: list[Path] = []

    def make(size_kib: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill_disk(folder: Path, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``folder`` until at most ``leave_bytes`` are free; returns the filler file."""
    import shutil

    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        while shutil.disk_usage(folder).free > leave_bytes:
            chunk = min(1 << 16, shutil.disk_usage(folder).free - leave_bytes)
            try:
                f.write(b"\0" * max(chunk, 1))
                f.flush()
            except OSError:
                break
    return filler


@pytest.fixture
def fill_disk() -> Callable[..., Path]:
    """``fill_disk(folder, leave_bytes=0)``: fill ``folder``'s file system (a ``small_disk``) up to the last bytes."""
    return _fill_disk


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write in, root included (a read-only tmpfs); chmod where mounting is not allowed
    and we are not root; skips otherwise."""
    where = tmp_path / "read_only"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode == 0:
        yield where
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip(f"cannot make a read-only folder here: {done.stderr.decode().strip()}")
    where.chmod(0o500)
    yield where
    where.chmod(0o700)
