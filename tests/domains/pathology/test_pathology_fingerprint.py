"""The weights fingerprint of ``embed --domain pathology`` is hashed beside the first slide's start-up, never
instead of being checked: existing files are compared with the whole key, new files carry it."""

from __future__ import annotations

import argparse
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import write_svs

from foundation.batch.runner import Item
from foundation.errors import OutputError
from foundation.models.fingerprint import weights_fingerprint
from foundation.models.vit import build_vit
from foundation_domains.pathology.embed import SlideEmbedder, existing_output, fingerprint_in_background
from foundation_domains.pathology.source import PathologyOptions

ARGS = dict(arch="vit_tiny", in_chans=3, img_size=32, patch_size=16, reg_tokens=0)


class _NotYet(Future):
    """A fingerprint still being hashed: asking for it fails the test (rather than hang it)."""

    def result(self, timeout: float | None = None) -> str:
        raise AssertionError("the fingerprint was asked for")


def _embedder(fingerprint: Future[str] | str, data: Path) -> SlideEmbedder:
    torch.manual_seed(0)
    args = argparse.Namespace(pooling="cls", batch_size=4, num_workers=0, quiet=True, data=str(data))
    meta = {"mean": [0.5] * 3, "std": [0.5] * 3}
    return SlideEmbedder(
        build_vit(**ARGS), fingerprint, args, PathologyOptions(), {}, torch.device("cpu"), "bb", meta
    )


def test_background_fingerprint_is_that_of_the_weights_when_called() -> None:
    torch.manual_seed(0)
    model = build_vit(**ARGS)
    expected = weights_fingerprint(model)
    future = fingerprint_in_background(model)
    model.to(torch.float64)  # moved afterwards (as to a device): the weights given are the ones hashed
    assert future.result(timeout=60) == expected


def test_plan_waits_for_the_fingerprint_only_to_compare_with_an_existing_file(tmp_path: Path) -> None:
    write_svs(tmp_path / "a.svs")
    write_svs(tmp_path / "b.svs")
    work = [
        Item(0, "a.svs", tmp_path / "a.svs", tmp_path / "a.h5"),
        Item(1, "b.svs", tmp_path / "b.svs", tmp_path / "b.h5"),
    ]
    assert [existing_output(_embedder(_NotYet(), tmp_path), item, overwrite=False) for item in work] == [
        None,
        None,
    ]

    (tmp_path / "a.h5").write_bytes(b"not ours")  # now the key is needed for a.h5
    resolved: Future[str] = Future()
    resolved.set_result("0123456789abcdef")
    with pytest.raises(OutputError, match="is not a feature file of ours"):
        existing_output(_embedder(resolved, tmp_path), work[0], overwrite=True)
    assert existing_output(_embedder(resolved, tmp_path), work[1], overwrite=True) is None
    assert _embedder(resolved, tmp_path).key["backbone_fingerprint"] == "0123456789abcdef"


def test_feature_key_of_a_backbone_without_statistics_uses_imagenet_s() -> None:
    """A backbone that recorded no mean/std is normalised with the domain's defaults (ImageNet's), and the key
    says so; the stateless domain has no class attributes to read them from."""
    from foundation.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
    from foundation_domains.pathology.embed import feature_key

    key = feature_key("fp", {}, PathologyOptions(), "cls")
    assert key["mean"].tolist() == list(IMAGENET_MEAN) and key["std"].tolist() == list(IMAGENET_STD)
    own = feature_key("fp", {"mean": [0.5] * 3, "std": [0.25] * 3}, PathologyOptions(), "cls")
    assert own["mean"].tolist() == [0.5] * 3 and own["std"].tolist() == [0.25] * 3
