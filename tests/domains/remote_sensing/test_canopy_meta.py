"""CanopyMeta: one writer, one reader; checkpoints written before it existed load unchanged through Task.load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from canopy_testdata import meta_dict_for

from foundation.errors import CheckpointError
from foundation.models.vit import build_vit
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.remote_sensing.canopy.meta import CanopyMeta
from foundation_domains.remote_sensing.canopy.model import build_canopy_net
from foundation_domains.remote_sensing.canopy.task import CanopyHeightTask


def test_round_trip_keeps_the_stored_dict() -> None:
    stored = meta_dict_for(3, bands=[4, 3, 2], scale=10000, nodata=0, gsd=10.0)
    meta = CanopyMeta.from_dict(stored, "m.pt")
    assert meta.bands == (4, 3, 2) and meta.scale == 10000 and meta.nodata == 0 and meta.in_chans == 3
    assert meta.to_dict() == stored
    assert CanopyMeta.from_dict(meta.to_dict(), "m.pt") == meta
    assert "nodata" not in replace(meta, nodata=None).to_dict()  # written only when set, as before


def test_optional_keys_take_their_old_defaults() -> None:
    stored = meta_dict_for(2)
    for key in ("bands", "scale", "tile_size", "gsd", "max_height"):
        del stored[key]
    meta = CanopyMeta.from_dict(stored, "m.pt")
    assert (meta.bands, meta.scale, meta.tile_size, meta.gsd, meta.max_height) == (
        None,
        "auto",
        256,
        None,
        96.0,
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [({"in_chans": None}, "in_chans"), ({"mean": "0.2"}, "mean"), ({"bands": [1, "x"]}, "bands")],
)
def test_a_broken_key_is_refused_naming_the_file_and_the_key(change, key) -> None:
    stored = {**meta_dict_for(2), **change}
    with pytest.raises(CheckpointError, match=rf"broken\.pt.*'{key}'"):
        CanopyMeta.from_dict(stored, "broken.pt")
    missing = meta_dict_for(2)
    del missing["head"]
    with pytest.raises(CheckpointError, match=r"broken\.pt: task_meta has no 'head'"):
        CanopyMeta.from_dict(missing, "broken.pt")
    with pytest.raises(CheckpointError, match="3 'mean' / 2 'std'"):
        CanopyMeta.from_dict(meta_dict_for(2, mean=[0.1] * 3), "broken.pt")


def test_task_load_of_an_old_format_file_predicts_as_the_old_loader(tmp_path, single_thread) -> None:
    torch.manual_seed(0)
    args = {"arch": "vit_tiny", "in_chans": 2, "img_size": 32, "patch_size": 16}
    stored = meta_dict_for(2, head={"mode": "bins", "features": 8, "bins": 4}, nodata=-1.0)
    net = build_canopy_net(build_vit(**args), stored["head"])
    path = save_task_model(
        tmp_path / "model.pt", task="canopy-height", task_meta=stored, backbone_args=args, net=net,
        config={}, step=7,
    )  # fmt: skip
    # the path load_canopy_model took: the network its task_meta["head"] describes, weights loaded
    old = build_canopy_net(build_vit(**args, init_weights=False), stored["head"])
    old.load_state_dict(torch.load(path, weights_only=True)["net"])
    model = CanopyHeightTask().load(tmp_path)
    assert model.meta.to_dict() == stored and model.step == 7 and model.run_dir == tmp_path
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.net.predict_height(x), old.eval().predict_height(x))
    broken = save_task_model(
        tmp_path / "broken.pt", task="canopy-height", task_meta={**stored, "std": None}, backbone_args=args,
        net=net, config={}, step=7,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"broken\.pt: task_meta has a null 'std'"):
        CanopyHeightTask().load(broken)
