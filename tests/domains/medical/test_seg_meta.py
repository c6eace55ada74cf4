"""SegmentationMeta: one writer, one reader; checkpoints written before it existed load unchanged."""

from __future__ import annotations

import pytest
import torch
from test_segment import make_checkpoint, task_meta

from foundation.errors import CheckpointError
from foundation.models.vit import build_vit
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.medical.segmentation.meta import SegmentationMeta
from foundation_domains.medical.segmentation.model import build_segmentation_net
from foundation_domains.medical.segmentation.task import OrganSegmentationTask


def test_round_trip_keeps_the_stored_dict() -> None:
    stored = task_meta(spacing=(1.5, 1.5, 2.0))
    meta = SegmentationMeta.from_dict(stored, "m.pt")
    assert (
        meta.roi_size == (16, 16, 16) and meta.spacing == (1.5, 1.5, 2.0) and meta.window == (-175.0, 250.0)
    )
    assert meta.class_names()[0] == "background" and meta.sw_batch_size == 2
    assert meta.to_dict() == stored
    assert SegmentationMeta.from_dict(meta.to_dict(), "m.pt") == meta


def test_optional_keys_take_their_old_defaults() -> None:
    stored = {
        k: v for k, v in task_meta().items() if k not in ("spacing", "modality", "overlap", "sw_batch_size")
    }
    meta = SegmentationMeta.from_dict(stored, "m.pt")
    assert (meta.spacing, meta.modality, meta.overlap, meta.sw_batch_size) == (None, "ct", 0.5, None)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"roi_size": None}, "roi_size"),
        ({"labels": {"liver": "1"}}, "labels"),
        ({"modality": "pet"}, "modality"),
    ],
)
def test_a_broken_key_is_refused_naming_the_file_and_the_key(change, key) -> None:
    with pytest.raises(CheckpointError, match=rf"broken\.pt.*'{key}'"):
        SegmentationMeta.from_dict({**task_meta(), **change}, "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt: task_meta has no 'window'"):
        SegmentationMeta.from_dict({k: v for k, v in task_meta().items() if k != "window"}, "broken.pt")
    with pytest.raises(CheckpointError, match="not a mapping"):
        SegmentationMeta.from_dict([], "broken.pt")


def test_task_load_of_an_old_format_file_predicts_as_the_old_loader(tmp_path, single_thread) -> None:
    path = make_checkpoint(tmp_path / "run")
    stored = torch.load(path, weights_only=True)
    # the path load_segmentation_model took: the network task_meta["head"] describes, weights loaded
    old = build_segmentation_net(build_vit(**stored["backbone_args"]), stored["task_meta"]["head"])
    old.load_state_dict(stored["net"])
    model = OrganSegmentationTask().load(tmp_path / "run")
    assert model.meta.to_dict() == stored["task_meta"] and model.source == path
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.net(x), old.eval()(x))
    broken = save_task_model(
        tmp_path / "broken.pt", task="organ-segmentation", task_meta={**stored["task_meta"], "in_chans": "one"},
        backbone_args=stored["backbone_args"], net=old, config={}, step=0,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"broken\.pt: task_meta\['in_chans'\]='one'"):
        OrganSegmentationTask().load(broken)
