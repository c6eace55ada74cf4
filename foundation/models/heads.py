"""Projection heads for self-supervised pretraining.

The DINO/iBOT head of DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193): an MLP to a small
bottleneck, L2 normalisation, then a weight-normalised linear layer to K prototypes, so the logits are
cosine similarities to the prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised prototypes (``last_layer``; frozen early in training)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        """Build the head.

        Args:
            in_dim: Backbone feature width.
            out_dim: Number of prototypes K.
            hidden_dim: MLP hidden width.
            bottleneck_dim: Width of the L2-normalised bottleneck.
            nlayers: Number of Linear layers in the MLP; 1 means a single Linear in_dim -> bottleneck_dim.
        """
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            _positive(name, value)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for k in range(nlayers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)

        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self._init_weights(last)
        # W = g * v / ||v|| per prototype; g is fixed to 1 so every prototype is a unit vector.
        self.last_layer = weight_norm(last, name="weight", dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0  # g: (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map (..., in_dim) features to (..., out_dim) prototype scores."""
        x = self.mlp(x)
        # 1e-12 underflows to 0 in float16; 1e-6 keeps the division safe there.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
