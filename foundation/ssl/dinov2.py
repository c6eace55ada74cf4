"""DINOv2 (Oquab et al. 2023, arXiv 2304.07193): DINO CLS loss + iBOT masked-patch loss + KoLeo, with an
EMA teacher, untied heads and softmax or Sinkhorn-Knopp centering.

Notation: student temperature tau_s, teacher temperature tau_t (warmed up), EMA momentum m (cosine to 1).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from foundation.config import CropsConfig, SSLConfig
from foundation.models.heads import DINOHead
from foundation.models.vit import ViT
from foundation.ssl.indicators import TeacherIndicators
from foundation.ssl.losses import DINOClsLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from foundation.ssl.losses.centering import SoftmaxCenter
from foundation.ssl.masking import BlockMaskGenerator
from foundation.train.parallel import local
from foundation.train.schedules import cosine_schedule, warmup_then_constant


class IBOTMaskSampler:
    """Per-sample iBOT masks for the global crops: with probability ``p`` a crop gets block masks over a
    ratio drawn uniformly in ``[r_min, r_max]``; otherwise no patch is masked."""

    def __init__(self, grid: tuple[int, ...], probability: float, ratio_min: float, ratio_max: float) -> None:
        self.grid = tuple(grid)
        self.n = math.prod(self.grid)
        self.probability = probability
        self.ratio_min, self.ratio_max = ratio_min, ratio_max
        self.blocks = BlockMaskGenerator(self.grid) if len(self.grid) == 2 else None

    def one(self, generator: torch.Generator) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) >= self.probability:
            return torch.zeros(self.n, dtype=torch.bool)
        ratio = self.ratio_min + (self.ratio_max - self.ratio_min) * float(
            torch.rand((), generator=generator)
        )
        count = round(ratio * self.n)
        if self.blocks is not None:
            return self.blocks(count, generator).flatten()
        mask = torch.zeros(self.n, dtype=torch.bool)  # 3D: random patches
        mask[torch.randperm(self.n, generator=generator)[:count]] = True
        return mask

    def __call__(self, views: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        return {"masks": [self.one(generator) for _ in views["global_crops"]]}


class DINOv2(nn.Module):
    """Student and EMA teacher (backbone + DINO head + iBOT head) and the three losses.

    ``forward(batch, step)`` returns ``{"loss", "dino", "ibot", "koleo"}``; :meth:`update_teacher` is called
    by the engine after each optimiser step. The batch holds ``global_crops`` ``(2B, C, H, W)`` crop-major,
    ``local_crops`` ``(n_local * B, C, h, w)`` or None, and ``masks`` ``(2B, N)``.
    """

    backbone_prefix = "student.backbone."
    export_prefix = "teacher.backbone."

    def __init__(self, backbone: ViT, cfg: SSLConfig, total_steps: int) -> None:
        super().__init__()
        self.cfg = cfg
        dim = backbone.embed_dim

        def head(k: int) -> DINOHead:
            return DINOHead(dim, k, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)

        k_ibot = cfg.ibot_prototypes or cfg.head_prototypes
        student = nn.ModuleDict({"backbone": backbone, "dino_head": head(cfg.head_prototypes)})
        if cfg.ibot_separate_head:
            student["ibot_head"] = head(k_ibot)
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        # The teacher never needs drop-path: it is an inference-mode average of the student.
        for module in self.teacher.modules():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.dino_loss = DINOClsLoss(cfg.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.student_temp)
        self.koleo_loss = KoLeoLoss()
        self.dino_center = SoftmaxCenter(cfg.head_prototypes, cfg.center_momentum)
        self.ibot_center = SoftmaxCenter(k_ibot, cfg.center_momentum)
        self.teacher_temp = warmup_then_constant(
            cfg.teacher_temp_warmup, cfg.teacher_temp, total_steps, cfg.teacher_temp_warmup_steps
        )
        self.momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, total_steps)

    @property
    def student_backbone(self) -> ViT:
        return self.student["backbone"]

    def export_backbone(self) -> ViT:
        """The teacher's backbone: the EMA weights are the better features (DINO)."""
        return self.teacher["backbone"]

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"student.{n}", p) for n, p in self.student.named_parameters() if p.requires_grad]

    def _ibot_head(self, modules: nn.ModuleDict) -> DINOHead:
        return modules["ibot_head"] if "ibot_head" in modules else modules["dino_head"]

    def _teacher_probs(self, logits: torch.Tensor, center: SoftmaxCenter, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        probs = center(logits, temp)
        center.update(logits)
        return probs

    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor, temp: float):
        out = self.teacher["backbone"].forward_dict(global_crops)
        cls_logits = self.teacher["dino_head"](out["cls"])
        dino_probs = self._teacher_probs(cls_logits.float(), self.dino_center, temp)
        indicators = TeacherIndicators.measure(dino_probs, out["cls"])
        # Every rank runs the iBOT head and its centering even with no masked patch of its own: centering
        # reduces over ranks, and a rank skipping it would pair its next collective with the wrong call.
        ibot_logits = self._ibot_head(self.teacher)(out["patch"][masks])
        ibot_probs = self._teacher_probs(ibot_logits.float(), self.ibot_center, temp)
        return list(dino_probs.chunk(2)), ibot_probs, indicators

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        temp = float(self.teacher_temp[min(step, len(self.teacher_temp) - 1)])
        global_crops, masks = batch["global_crops"], batch["masks"]
        local_crops = batch.get("local_crops")
        teacher_dino, teacher_ibot, indicators = self._teacher_targets(global_crops, masks, temp)

        backbone = self.student["backbone"]
        g = backbone.forward_dict(global_crops, masks=masks)
        student_global = self.student["dino_head"](g["cls"]).chunk(2)
        # Global crop i is matched with the teacher's other global crop (pairs with i == j skipped).
        n_global_pairs, dino_global = (
            2,
            self.dino_loss(list(student_global), teacher_dino, skip_same_index=True),
        )
        dino = dino_global
        if local_crops is not None and local_crops.shape[0] > 0:
            n_local = local_crops.shape[0] // (global_crops.shape[0] // 2)
            student_local = self.student["dino_head"](backbone.forward_dict(local_crops)["cls"]).chunk(
                n_local
            )
            dino_local = self.dino_loss(list(student_local), teacher_dino)
            n_local_pairs = 2 * n_local
            # Every (student view, teacher view) pair counts once, as in the paper.
            dino = (dino_global * n_global_pairs + dino_local * n_local_pairs) / (
                n_global_pairs + n_local_pairs
            )

        # zero (graph kept, so DDP sees the iBOT head's gradients on every rank) when nothing is masked
        student_ibot = self._ibot_head(self.student)(g["patch"][masks])
        ibot = self.ibot_loss(student_ibot, teacher_ibot, masks)

        koleo = sum(self.koleo_loss(c) for c in g["cls"].chunk(2))
        loss = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
        values = {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}
        values.update({k: torch.tensor(v) for k, v in indicators.as_metrics().items()})
        return values

    @torch.no_grad()
    def update_teacher(self, step: int) -> dict[str, float]:
        """EMA: teacher <- m * teacher + (1 - m) * student."""
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        # on this rank's shards when FSDP shards both (student and teacher are sharded alike)
        t_params = [local(p) for p in self.teacher.parameters()]
        s_params = [local(p.detach()) for p in self.student.parameters()]
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
        return {
            "momentum": m,
            "teacher_temp": float(self.teacher_temp[min(step, len(self.teacher_temp) - 1)]),
        }


def make_dinov2(backbone: ViT, cfg: SSLConfig, crops: CropsConfig, total_steps: int):
    """The objective and the per-sample extras it needs from the data (iBOT masks)."""
    grid = (crops.global_size // backbone.patch_size,) * backbone.spatial_dims
    masks = IBOTMaskSampler(grid, cfg.mask_probability, cfg.mask_ratio_min, cfg.mask_ratio_max)
    return DINOv2(backbone, cfg, total_steps), masks
