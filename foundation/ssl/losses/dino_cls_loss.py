"""DINO cross-entropy between student and teacher [CLS] prototype distributions.

From DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193): the student's prototype scores on every
crop are pulled towards the (centred, sharpened) teacher targets of the global crops.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DINOClsLoss(nn.Module):
    """Mean over (student view, teacher view) pairs of H(p_t, p_s) = -sum_k p_t[k] log p_s[k]."""

    def __init__(self, student_temp: float = 0.1) -> None:
        """Store the student temperature.

        Args:
            student_temp: Student temperature tau_s; DINOv2 uses 0.1.
        """
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        self.student_temp = float(student_temp)

    def forward(
        self,
        student_logits: list[Tensor],
        teacher_probs: list[Tensor],
        skip_same_index: bool = False,
    ) -> Tensor:
        """Average the cross-entropy over all pairs so the scale does not grow with the number of crops.

        Args:
            student_logits: One (B, K) tensor of student prototype scores g_s per student view.
            teacher_probs: One (B, K) tensor of teacher target probabilities p_t per teacher view.
            skip_same_index: Skip pairs (i, i), i.e. a global crop predicting its own teacher target,
                when the first student views are the same crops as the teacher views.

        Returns:
            Scalar loss.
        """
        if len(student_logits) == 0 or len(teacher_probs) == 0:
            raise ValueError(
                f"need at least one student and one teacher view, got {len(student_logits)!r} and "
                f"{len(teacher_probs)!r}"
            )
        total: Tensor | None = None
        n_pairs = 0
        for i, s in enumerate(student_logits):
            # log p_s = log softmax(g_s / tau_s), in float32 for bf16/fp16 autocast safety.
            log_p_s = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for j, p_t in enumerate(teacher_probs):
                if skip_same_index and i == j:
                    continue
                if p_t.shape != s.shape:
                    raise ValueError(
                        f"student view {i} has shape {tuple(s.shape)!r} but teacher view {j} has "
                        f"{tuple(p_t.shape)!r}"
                    )
                ce = -(p_t.float() * log_p_s).sum(dim=-1).mean()  # H(p_t, p_s), batch mean
                total = ce if total is None else total + ce
                n_pairs += 1
        if total is None:
            raise ValueError(
                f"no (student, teacher) pair left: {len(student_logits)!r} student view(s), "
                f"{len(teacher_probs)!r} teacher view(s), skip_same_index={skip_same_index!r}"
            )
        return total / n_pairs
