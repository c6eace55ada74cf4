"""The canopy-height network: our ViT plus a DPT head, and loading a fine-tuned one from ``RUN/model.pt``.

``forward`` returns what the loss needs (heights in metres, or bin logits); ``predict_height`` always returns
metres (the expectation over bin centres for the binned head), so map making does not care which head it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.models.vit import ViT, build_vit
from foundation.tasks.loaded import LoadedTask, load_task_model
from foundation_domains.remote_sensing.canopy.head import DPTHead, HeadOptions
from foundation_domains.remote_sensing.canopy.losses import expected_height
from foundation_domains.remote_sensing.canopy.meta import TASK_NAME, CanopyMeta

# Regression outputs softplus(z) * max_height / REGRESSION_UNITS, so an untrained head starts near 7 m and
# Adam's parameter-sized steps move the output by a useful number of metres.
REGRESSION_UNITS = 10.0


class CanopyNet(nn.Module):
    """``forward(x)``: ``B x 1 x H x W`` metres (regression) or ``B x K x H x W`` logits (bins)."""

    def __init__(self, backbone: ViT, opts: HeadOptions) -> None:
        super().__init__()
        self.backbone = backbone
        self.opts = opts
        self.head = DPTHead(backbone.embed_dim, backbone.patch_size, len(backbone.blocks), opts)
        self.register_buffer(
            "bin_centers",
            torch.linspace(0.0, float(opts.max_height), int(opts.bins) if opts.mode == "bins" else 2),
            persistent=False,
        )

    @property
    def mode(self) -> str:
        return self.opts.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.backbone.get_intermediate_layers(x, self.head.layers)
        out = self.head(tokens, grid, tuple(x.shape[-2:]))
        if self.mode == "regression":
            # in float32 even under autocast: bf16 would round heights to ~0.1 m
            return nn.functional.softplus(out.float()) * (float(self.opts.max_height) / REGRESSION_UNITS)
        return out

    def heights_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """Metres ``B x 1 x H x W`` from ``forward``'s output (expectation over bin centres for bins)."""
        if self.mode == "regression":
            return out
        return expected_height(out, self.bin_centers)

    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        """Canopy height in metres, ``B x 1 x H x W`` float, >= 0."""
        return self.heights_from_output(self(x)).float().clamp_min(0.0)


def build_canopy_net(backbone: ViT, head: dict[str, Any]) -> CanopyNet:
    """The network for ``backbone`` with the head described by ``head`` (see :class:`HeadOptions`).

    Raises:
        ConfigError: an unknown head option or a bad value.
    """
    return CanopyNet(backbone, HeadOptions.from_options(head))


def load_canopy(path: str | Path) -> LoadedTask[CanopyMeta]:
    """A fine-tuned canopy-height network in eval mode and its :class:`CanopyMeta` (``CanopyHeightTask.load``).

    Args:
        path: ``RUN/model.pt``, a run folder or a training checkpoint of ``foundation finetune canopy-height``.

    Raises:
        CheckpointError: missing or unreadable file, a model of another task, broken metadata, weights that do
            not fit.
    """

    def build(backbone_args: dict[str, Any], meta: CanopyMeta) -> CanopyNet:
        return build_canopy_net(build_vit(**backbone_args, init_weights=False), meta.head)

    return load_task_model(path, TASK_NAME, CanopyMeta.from_dict, build)
