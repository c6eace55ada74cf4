"""KoLeo regulariser: spread features uniformly on the sphere.

Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al. 2018, https://arxiv.org/abs/1806.03198),
applied in DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193) to the student [CLS] features with
weight 0.1: L_koleo = -(1/B) sum_i log(d_i), with d_i the distance from x_i to its nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps) on L2-normalised features, finite even for duplicates."""

    def __init__(self, eps: float = 1e-8) -> None:
        """Store eps, which keeps d_i and log(d_i) away from 0 (duplicates, tiny batches).

        Args:
            eps: Added inside the normalisation, the pairwise distance and the log.
        """
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, features: Tensor) -> Tensor:
        """Compute the loss for one batch of features.

        Args:
            features: (B, D) features, B >= 2 (a nearest neighbour needs another sample).

        Returns:
            Scalar float32 loss.
        """
        if features.ndim != 2:
            raise ValueError(f"features must be (B, D), got shape {tuple(features.shape)!r}")
        if features.shape[0] < 2:
            raise ValueError(f"KoLeo needs a batch of at least 2 samples, got B={features.shape[0]!r}")
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            # On the unit sphere the nearest neighbour is the largest dot product; exclude j == i.
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # below any cosine similarity
            nn_idx = sim.argmax(dim=1)
        # d_i = ||x_i - x_nn(i) + eps||: the eps keeps the norm (and its gradient) finite when x_i == x_nn(i).
        d = F.pairwise_distance(x, x[nn_idx], p=2.0, eps=self.eps)
        return -torch.log(d + self.eps).mean()
