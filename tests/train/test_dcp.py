"""Sharded checkpoint folders in one process: atomic writes, stale temporaries, incomplete folders refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foundation.errors import CheckpointError
from foundation.train import checkpoint as ckpt
from foundation.train import dcp


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_and_stale_temporaries(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    stale = folder / ".tmp-step_00000009"  # what a killed run leaves: never listed, removed by the next save
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"half")
    assert ckpt.list_checkpoints(tmp_path) == []

    model, optimizer = _model_and_optimizer(0)
    path = dcp.save_sharded(model, optimizer, {"step": 2, "note": "meta"}, folder, 2)
    assert not stale.exists()
    assert ckpt.list_checkpoints(tmp_path) == [path] and path.name == "step_00000002"
    meta = ckpt.load_checkpoint(path)
    assert meta == {"step": 2, "note": "meta", "sharded": True}

    other, other_opt = _model_and_optimizer(1)
    dcp.load_sharded(path, other, other_opt)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    assert torch.equal(
        other_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(dcp.read_tensors(path, "1.")["weight"], model[1].weight.detach())

    # the same step again (SIGTERM right after a checkpoint) keeps the complete folder as it is
    before = sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())
    assert dcp.save_sharded(other, other_opt, {"step": 2}, folder, 2) == path
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()) == before


def test_incomplete_folders_are_refused_by_name(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    model, optimizer = _model_and_optimizer(0)
    path = dcp.save_sharded(model, optimizer, {"step": 1}, folder, 1)
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(
        CheckpointError,
        match=r"step_00000001 is incomplete: shard file __0_0.distcp \(written by rank 0\) is truncated",
    ):
        ckpt.load_checkpoint(path)
    (path / "meta.pt").unlink()
    shard.unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        ckpt.load_checkpoint(path)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"not a sharded checkpoint \(.metadata is missing\)"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))


def test_only_folders_of_shards_are_removed(tmp_path):
    from foundation.train.checkpoint import prune

    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        folder = ckpts / f"step_{step:08d}"
        folder.mkdir(parents=True)
        for name in (".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"):
            (folder / name).write_bytes(b"x")
    (ckpts / "step_00000002" / "notes.txt").write_text("a user's file")
    prune(tmp_path, keep=1)
    assert not (ckpts / "step_00000001").exists()  # ours: removed
    assert (
        ckpts / "step_00000002" / "notes.txt"
    ).read_text() == "a user's file"  # holds something else: kept
    assert (ckpts / "step_00000003").is_dir()
