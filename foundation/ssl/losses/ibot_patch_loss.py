"""iBOT masked-patch cross-entropy.

From DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193), after iBOT: the student sees masked
global crops and must predict, at each masked patch, the teacher's prototype distribution for that patch
of the unmasked crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IBOTPatchLoss(nn.Module):
    """Per-image mean of H(p_t, p_s) over masked patches, averaged over all images of the batch."""

    def __init__(self, student_temp: float = 0.1) -> None:
        """Store the student temperature.

        Args:
            student_temp: Student temperature tau_s; DINOv2 uses 0.1.
        """
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        self.student_temp = float(student_temp)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """Weight patches by 1/|masked(n)| so an image counts the same however many patches it masks.

        Args:
            student_logits: (M, K) student scores g_s, masked patches only, in ``masks`` row-major order.
            teacher_probs: (M, K) teacher targets p_t for the same patches.
            masks: (N, P) bool, True where patch p of image n is masked; M == masks.sum().

        Returns:
            Scalar loss: (1/N) sum_n mean_{p masked in n} H(p_t, p_s). Zero (graph kept) when M == 0.
        """
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"masks must be a (N, P) bool tensor, got {masks.dtype!r} {tuple(masks.shape)!r}"
            )
        if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"student_logits and teacher_probs must both be (M, K), got {tuple(student_logits.shape)!r} "
                f"and {tuple(teacher_probs.shape)!r}"
            )
        num_images = masks.shape[0]  # N, images without masked patches included
        # w_n = 1 / max(1, |masked(n)|), broadcast to each masked patch: (M,)
        weights = (1.0 / masks.sum(dim=-1).clamp_min(1).float()).unsqueeze(-1).expand_as(masks)[masks]
        if weights.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"masks select {weights.shape[0]!r} patches but student_logits has "
                f"{student_logits.shape[0]!r} rows"
            )
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0
        log_p_s = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        ce = -(teacher_probs.float() * log_p_s).sum(dim=-1)  # H(p_t, p_s) per masked patch
        return (ce * weights.to(ce.device)).sum() / num_images
