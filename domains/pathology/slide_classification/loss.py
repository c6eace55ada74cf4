"""Bag cross-entropy (optionally class-weighted per fold) plus CLAM's optional instance loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SlideLoss(nn.Module):
    """``loss(prediction, batch)`` for :class:`~foundation_domains.pathology.slide_classification.model.SlideMIL`.

    Args:
        class_weights: ``folds x classes``: each fold's weights (``n / (C n_c)`` of its training slides, so rare
            labels count as much as common ones), or None for plain cross-entropy.
        instance_weight: share of the instance loss (CLAM's ``1 - bag_weight``: 0.3); 0 disables it.
        instance_k: tiles taken from each end of the attention ranking (CLAM's ``k_sample``).
    """

    def __init__(self, class_weights: torch.Tensor | None, instance_weight: float = 0.0, instance_k: int = 8):
        super().__init__()
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0))
        self.instance_weight = instance_weight
        self.instance_k = instance_k

    def forward(self, pred: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        label, fold = batch["label"], batch["fold"]
        ce = F.cross_entropy(pred["logits"].float(), label, reduction="none")
        if self.class_weights.numel():
            w = self.class_weights[fold, label]
            bag = (w * ce).sum() / w.sum()
        else:
            bag = ce.mean()
        out = {"bag_loss": bag.detach()}
        loss = bag
        if self.instance_weight and "tile_logits" in pred:
            inst = self.instance_loss(pred["tile_logits"].float(), pred["attention"], batch["mask"], label)
            loss = (1 - self.instance_weight) * bag + self.instance_weight * inst
            out["instance_loss"] = inst.detach()
        out["loss"] = loss + pred["zero"]
        return out

    def instance_loss(
        self, tile_logits: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """CLAM: for each bag, its class's tile classifier learns the ``k`` most attended real tiles as positive
        and the ``k`` least attended as negative (fewer when the bag is small)."""
        losses = []
        for i in range(len(label)):
            n = int(mask[i].sum())
            k = min(self.instance_k, n // 2)
            if k < 1:
                continue
            a = attention[i, :n].detach()  # padding comes last; ranking is not trained through
            order = torch.argsort(a, descending=True)
            pick = torch.cat([order[:k], order[-k:]])
            target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(label.device)
            losses.append(F.cross_entropy(tile_logits[i, pick, int(label[i])], target))
        return torch.stack(losses).mean() if losses else tile_logits.sum() * 0.0
