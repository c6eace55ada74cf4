"""Feature extraction over a tiny ViT (order, pooling, labels) and the HDF5 feature cache."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from foundation.errors import ConfigError, DataError
from foundation.eval.features import cached_features, extract_features, feature_cache_key
from foundation.models.vit import build_vit


class TinyDataset:
    """In-memory LabelledDataset: distinct random images, labels ``i % 3``, ids ``img-i``."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": index % 3, "id": f"img-{index}"}


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny", in_chans=3, patch_size=8, img_size=32)


def test_cls_features_keep_order(backbone: torch.nn.Module) -> None:
    data = TinyDataset(5)
    backbone.train()
    feats, labels, ids = extract_features(backbone, data, batch_size=2)
    assert feats.shape == (5, 192) and feats.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 0, 1]
    assert ids == [f"img-{i}" for i in range(5)]
    assert backbone.training  # mode restored
    backbone.eval()
    with torch.no_grad():
        expected = backbone.forward_dict(data.images)["cls"]
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)


def test_cls_plus_mean(backbone: torch.nn.Module) -> None:
    data = TinyDataset(4)
    feats, _, _ = extract_features(backbone, data, batch_size=3, pooling="cls+mean")
    assert feats.shape == (4, 384)
    with torch.no_grad():
        out = backbone.eval().forward_dict(data.images)
    torch.testing.assert_close(feats[:, :192], out["cls"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[:, 192:], out["patch"].mean(1), atol=1e-4, rtol=1e-4)


def test_bad_pooling_and_empty_dataset(backbone: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="'max'.*cls\\+mean"):
        extract_features(backbone, TinyDataset(2), pooling="max")
    with pytest.raises(DataError, match="empty"):
        extract_features(backbone, TinyDataset(0))


def fake_triple() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return torch.arange(12, dtype=torch.float32).view(3, 4), torch.tensor([2, 0, 1]), ["a", "béta", "c/d"]


def test_cache_hits_skip_compute(tmp_path: Path) -> None:
    calls = []

    def compute():
        calls.append(1)
        return fake_triple()

    key = feature_cache_key("ckpt.pt", "dataset", "cls")
    first = cached_features(tmp_path / "cache", key, compute)
    second = cached_features(tmp_path / "cache", key, compute)
    assert len(calls) == 1
    for got in (first, second):
        torch.testing.assert_close(got[0], fake_triple()[0])
        assert got[1].dtype == torch.int64 and got[1].tolist() == [2, 0, 1]
        assert got[2] == ["a", "béta", "c/d"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.h5"]  # no temporary left


def test_incomplete_or_corrupt_file_is_recomputed(tmp_path: Path) -> None:
    calls = []

    def compute():
        calls.append(1)
        return fake_triple()

    with h5py.File(tmp_path / "partial.h5", "w") as f:  # datasets written, never marked complete
        f.create_dataset("features", data=np.zeros((3, 4), np.float32))
        f.create_dataset("labels", data=np.zeros(3, np.int64))
    features, _, _ = cached_features(tmp_path, "partial", compute)
    assert len(calls) == 1 and features[2, 3].item() == 11.0
    cached_features(tmp_path, "partial", compute)
    assert len(calls) == 1  # now complete

    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    cached_features(tmp_path, "junk", compute)
    assert len(calls) == 2


def test_cache_key_and_bad_inputs(tmp_path: Path) -> None:
    key = feature_cache_key("a", "b")
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == feature_cache_key("a", "b")
    assert feature_cache_key("ab", "c") != feature_cache_key("a", "bc")
    with pytest.raises(ConfigError, match="'x/y'"):
        cached_features(tmp_path, "x/y", fake_triple)
    with pytest.raises(DataError, match="ids"):
        cached_features(tmp_path, "bad", lambda: (torch.zeros(3, 2), torch.zeros(3), ["a"]))
