"""Masked canopy-height losses: pixels without a valid label (nodata, NaN, outside the lidar footprint)
contribute nothing.

Regression: L1 or Huber on metres. Bins: cross-entropy on the label's nearest bin centre, plus an optional L1 on
the expectation over bin centres (CHMv2-style classification with a metric term). A batch without a single
valid label gives a loss of exactly zero that still depends on the output, so every rank runs the same
backward (DDP) and nothing becomes NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError

REGRESSION_LOSSES = ("l1", "huber")


def valid_labels(target: torch.Tensor) -> torch.Tensor:
    """Finite labels are valid; nodata arrives as NaN."""
    return torch.isfinite(target)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``valid``; 0 (with a gradient path) when nothing is valid."""
    values = torch.where(valid, values, torch.zeros_like(values))
    return values.sum() / valid.sum().clamp_min(1)


def masked_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "l1", delta: float = 1.0
) -> torch.Tensor:
    """L1 or Huber (``delta`` in metres) between ``pred`` and ``target`` (same shape) over valid labels."""
    valid = valid_labels(target)
    safe = torch.where(valid, target, pred.detach()).to(pred.dtype)  # no NaN enters the graph
    if kind == "l1":
        per_pixel = (pred - safe).abs()
    elif kind == "huber":
        per_pixel = F.huber_loss(pred, safe, reduction="none", delta=delta)
    else:
        raise ConfigError(f"task.options.loss.regression={kind!r} is not one of {list(REGRESSION_LOSSES)}")
    return masked_mean(per_pixel, valid)


def height_to_bin(target: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin centre (evenly spaced from 0 to max height); out-of-range heights clamp."""
    k = len(centers)
    top = float(centers[-1])
    scaled = torch.nan_to_num(target, nan=0.0) / top * (k - 1)
    return scaled.round().clamp(0, k - 1).long()


def expected_height(logits: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``B x 1 x H x W`` metres: the expectation of the bin centres under the softmax of ``B x K x H x W``."""
    probs = logits.float().softmax(dim=1)
    return torch.einsum("bkhw,k->bhw", probs, centers.float().to(logits.device)).unsqueeze(1)


def masked_bins_loss(logits: torch.Tensor, target: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``B x K x H x W`` logits against the label's bin (``target`` ``B x 1 x H x W``)."""
    valid = valid_labels(target[:, 0])
    ce = F.cross_entropy(logits.float(), height_to_bin(target[:, 0], centers), reduction="none")
    return masked_mean(ce, valid)


@dataclass(frozen=True)
class LossOptions:
    """``task.options.loss``.

    Attributes:
        regression: ``l1`` or ``huber`` (regression head).
        huber_delta: Huber's transition point in metres.
        l1_weight: weight of the L1 on the expectation over bin centres (bins head); 0 disables it.
    """

    regression: str = "l1"
    huber_delta: float = 1.0
    l1_weight: float = 0.05

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, cfg: Any = None) -> LossOptions:
        """Raises: ConfigError: unknown key or bad value, named as ``task.options.loss.KEY``."""
        options = dict(options or {})
        reject_unknown_keys(options, cls, "task.options.loss", "the canopy-height loss")
        opts = cls(**options)
        if opts.regression not in REGRESSION_LOSSES:
            raise ConfigError(
                f"task.options.loss.regression={opts.regression!r} is not one of {list(REGRESSION_LOSSES)}"
            )
        if not opts.huber_delta > 0 or opts.l1_weight < 0:
            raise ConfigError("task.options.loss: huber_delta must be > 0 and l1_weight >= 0")
        return opts


class CanopyLoss:
    """``loss(output, batch) -> {"loss", "mae", "valid"}`` for the engine; ``batch["height"]`` is metres
    ``B x 1 x H x W`` with NaN where there is no label; ``centers``: the bin centres (bins head)."""

    def __init__(self, mode: str, opts: LossOptions, centers: torch.Tensor | None = None) -> None:
        if mode == "bins" and centers is None:
            raise ValueError("the bins loss needs the bin centres")
        self.mode = mode
        self.opts = opts
        self.centers = centers

    def __call__(self, output: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        target = batch["height"].float()
        valid = valid_labels(target)
        pred = expected_height(output, self.centers) if self.mode == "bins" else output.float()
        mae = masked_regression_loss(pred, target, "l1")
        if self.mode == "regression":
            loss = masked_regression_loss(pred, target, self.opts.regression, self.opts.huber_delta)
        else:
            loss = masked_bins_loss(output, target, self.centers.to(output.device))
            if self.opts.l1_weight:
                loss = loss + self.opts.l1_weight * mae
        return {"loss": loss, "mae": mae.detach(), "valid": valid.float().mean().detach()}
