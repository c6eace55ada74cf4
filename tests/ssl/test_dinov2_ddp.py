"""DINOv2 under DDP when only some ranks have masked patches: every rank must make the same collectives."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from foundation.config import SSLConfig
from foundation.models.vit import build_vit
from foundation.ssl.dinov2 import DINOv2


def _worker(rank: int, init_file: str, centering: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)
        backbone = build_vit("vit_tiny", in_chans=3, img_size=16, patch_size=8)
        cfg = SSLConfig(
            head_prototypes=16, head_hidden_dim=32, head_bottleneck_dim=8, centering=centering,
            teacher_temp_warmup_steps=1,
        )  # fmt: skip
        model = DDP(DINOv2(backbone, cfg, total_steps=4), broadcast_buffers=False)
        generator = torch.Generator().manual_seed(rank)
        losses = []
        for step in range(2):
            masks = torch.zeros(4, 4, dtype=torch.bool)
            if rank == 0:
                masks[0, :2] = True  # rank 1 has no masked patch at all
            batch = {"global_crops": torch.randn(4, 3, 16, 16, generator=generator), "masks": masks}
            values = model(batch, step)
            values["loss"].backward()
            losses.append(float(values["loss"]))
        head = model.module.student["ibot_head"].mlp[0].weight.grad
        out[rank] = (losses, head.clone(), model.module.ibot_center.center.clone())
    finally:
        dist.destroy_process_group()


def _run(tmp_path, centering: str) -> dict:
    tmp_path.mkdir()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "store"), centering, out), nprocs=2)
        return dict(out)


def test_a_rank_without_masked_patches_keeps_the_collectives_paired(tmp_path) -> None:
    for centering in ("softmax", "sinkhorn_knopp"):
        results = _run(tmp_path / centering, centering)
        assert set(results) == {0, 1}
        # DDP averaged the iBOT head's gradients over both ranks (rank 1 took part with zero rows)
        torch.testing.assert_close(results[0][1], results[1][1])
        assert float(results[0][1].abs().sum()) > 0
        torch.testing.assert_close(results[0][2], results[1][2])  # one center, from the global batch
