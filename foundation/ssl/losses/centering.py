"""Teacher-side centering for DINO/iBOT targets.

Two ways to turn teacher prototype scores into target distributions without collapse, as used in
DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193):

* softmax centering with an EMA center ``c`` (DINO), and
* Sinkhorn-Knopp batch normalisation (SwAV-style), which DINOv2 uses for long runs.

Both are distributed-aware: statistics over the batch dimension are reduced across ranks so every rank
sees targets computed from the *global* batch, exactly as a single-process run would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x: Tensor, op: dist.ReduceOp | None = None) -> Tensor:
    """All-reduce (SUM by default) in place when a process group exists; a no-op otherwise."""
    if _is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op)
    return x


def _check_logits_and_temp(teacher_logits: Tensor, teacher_temp: float) -> None:
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be (B, K), got shape {tuple(teacher_logits.shape)!r}")
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp!r}")


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp targets: equipartition prototypes over the global batch to prevent collapse.

    Args:
        teacher_logits: (B, K) teacher prototype scores of this rank's shard of the batch.
        teacher_temp: Teacher temperature tau_t.
        n_iterations: Number of (row, column) normalisation rounds; DINOv2 uses 3.

    Returns:
        (B, K) float32 probabilities; every row sums to 1 and, at convergence, every prototype receives
        B/K mass over the global batch.
    """
    _check_logits_and_temp(teacher_logits, teacher_temp)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations!r}")
    logits = teacher_logits.float() / teacher_temp
    # Any per-prototype factor cancels in the first row normalisation, so shifting each prototype by its
    # global max is exact and keeps exp() from overflowing (and every row from underflowing to 0).
    # a rank may hold no row (no masked patch of its own): it still joins every reduce
    local_max = logits.max(dim=0).values if logits.shape[0] else logits.new_full(logits.shape[1:], -torch.inf)
    proto_max = _all_reduce(local_max, dist.ReduceOp.MAX)
    q = torch.exp(logits - proto_max).t()  # Q: (K, B), one column per sample
    num_prototypes = q.shape[0]  # K
    # B_total, the global batch size (B * world_size for equal shards; exact for unequal ones too)
    batch_total = _all_reduce(q.new_tensor([q.shape[1]]))
    tiny = torch.finfo(torch.float32).tiny  # an all-underflowed row or column gives 0, not 0/0 = NaN

    q /= _all_reduce(q.sum().reshape(1)).clamp_min(tiny)  # Q <- Q / sum(Q)
    for _ in range(n_iterations):
        # Rows (prototypes) get equal mass 1/K; row sums run over the global batch, hence the reduce.
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= num_prototypes
        # Columns (samples) get equal mass 1/B_total; each column lives on a single rank.
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= batch_total
    q *= batch_total  # columns now sum to 1: each sample's target is a distribution
    return q.t()


class SoftmaxCenter(nn.Module):
    """EMA-centred softmax targets (DINO): subtracting a running mean keeps one prototype from dominating.

    The EMA starts from the first batch's mean, not from zero. DINO's zero start makes the first ~1/(1 - m)
    steps' targets uncentred: every image gets the same sharp target (the shared part of the teacher's
    scores), and a student that already learns at full speed then maps every image to the same prototypes.
    At DINOv2's scale the lr warmup (thousands of steps) hides this; at small scale it is where runs collapse.
    """

    center: Tensor
    updates: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        """Create an empty center (set from the first batch).

        Args:
            out_dim: Number of prototypes K.
            momentum: EMA momentum m for the center; DINOv2 uses 0.9.
        """
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self._started = False  # mirrors updates > 0 without a device sync per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # A checkpoint written before the update count existed holds a center that has been trained.
        if prefix + "center" in state_dict and prefix + "updates" not in state_dict:
            state_dict[prefix + "updates"] = torch.ones((), dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._started = bool(self.updates.item() > 0)

    def _check(self, teacher_logits: Tensor) -> None:
        if teacher_logits.ndim < 1 or teacher_logits.shape[-1] != self.center.shape[-1]:
            raise ValueError(
                f"teacher_logits must be (..., {self.center.shape[-1]}), got {tuple(teacher_logits.shape)!r}"
            )

    def _batch_center(self, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The (1, K) mean over the global (all-rank) batch, and the global count."""
        flat = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        # Sum and count in one reduce, so ranks with unequal shards still give the exact global mean.
        stats = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
        _all_reduce(stats)
        count = stats[-1].to(self.center.device)
        return (stats[:-1].to(self.center.device) / count.clamp_min(1)).unsqueeze(0), count

    @torch.no_grad()
    def forward(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets softmax((g_t - c) / tau_t) with the current center (call ``update`` afterwards); before
        the first update, c is this batch's own mean.

        Args:
            teacher_logits: (..., K) teacher prototype scores g_t.
            teacher_temp: Teacher temperature tau_t.

        Returns:
            (..., K) float32 probabilities.
        """
        self._check(teacher_logits)
        if not teacher_temp > 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp!r}")
        center = self.center if self._started else self._batch_center(teacher_logits)[0]
        return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) mean(g_t), the mean taken over the global (all-rank) batch; the first update
        sets c to the mean.

        Args:
            teacher_logits: (..., K) teacher prototype scores of this rank; leading dims are the batch.
        """
        self._check(teacher_logits)
        batch_center, count = self._batch_center(teacher_logits)
        if self._started:
            new_center = self.momentum * self.center + (1.0 - self.momentum) * batch_center
        else:
            new_center = batch_center
        # An empty global batch leaves c unchanged; torch.where avoids a host sync on count.
        self.center.copy_(torch.where(count > 0, new_center, self.center))
        self.updates.add_((count > 0).long())
        self._started = self._started or bool(count.item() > 0)
