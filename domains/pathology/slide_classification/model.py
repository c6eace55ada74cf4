"""Attention MIL heads on bags of tile features, one per fold.

Gated attention pooling follows Ilse et al. 2018 (arXiv 1802.04712, eq. 9): ``a_i = softmax(w^T (tanh(V h_i) *
sigm(U h_i)))``, the slide is ``z = sum_i a_i h_i``. The optional instance loss is CLAM's (Lu et al. 2021,
arXiv 2004.09666): the most and least attended tiles of a bag become positive and negative examples of its class's
tile classifier. Mean pooling (every tile weighs the same) is the baseline.

All folds' heads live in one module so one run of the engine trains them all (resume, DDP and SIGTERM checkpoints
as for any task); ``best`` keeps each fold's weights at its best validation loss, which is what evaluation uses.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

HEADS = ("abmil", "mean")


@dataclass(frozen=True)
class HeadConfig:
    """Shape of one fold's head (stored with the model, so evaluation rebuilds it)."""

    in_dim: int
    n_classes: int
    head: str = "abmil"
    hidden: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    instance_loss: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class GatedAttention(nn.Module):
    """Attention scores of each tile, softmax over the bag's real (unpadded) tiles."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, attention_dim)
        self.u = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class MILHead(nn.Module):
    """``(B x N x D features, B x N mask) -> logits, attention (and tile logits for the instance loss)``."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = GatedAttention(cfg.hidden, cfg.attention_dim) if cfg.head == "abmil" else None
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)
        # CLAM's per-class tile classifiers (in class / not), one Linear for all classes
        self.instance = nn.Linear(cfg.hidden, 2 * cfg.n_classes) if cfg.instance_loss else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        if self.attention is not None:
            a = self.attention(h, mask)
        else:
            a = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
        z = torch.bmm(a.unsqueeze(1), h).squeeze(1)
        out = {"logits": self.classifier(z), "attention": a}
        if self.instance is not None:
            out["tile_logits"] = self.instance(h).unflatten(-1, (self.cfg.n_classes, 2))
        return out


class SlideMIL(nn.Module):
    """One :class:`MILHead` per fold; a batch's bags go to their fold's head.

    Buffers keep early stopping resumable: ``best_loss`` and ``evals_since_best`` per fold, and ``best`` holds
    each fold's weights at its best validation loss (``has_best``).
    """

    def __init__(self, cfg: HeadConfig, folds: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(MILHead(cfg) for _ in range(folds))
        self.best = copy.deepcopy(self.heads).requires_grad_(False)
        self.register_buffer("best_loss", torch.full((folds,), float("inf")))
        self.register_buffer("evals_since_best", torch.zeros(folds, dtype=torch.long))
        self.register_buffer("has_best", torch.zeros(folds, dtype=torch.bool))

    @property
    def folds(self) -> int:
        return len(self.heads)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, fold: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        present = fold.unique().tolist()
        if len(present) == 1:  # one fold in the batch (always, with one fold): the bags are not copied
            out = dict(self.heads[present[0]](features, mask))
        else:
            out = self._routed(features, mask, fold, present)
        # the heads of folds without a bag in this batch join the graph with zero weight, so DDP finds a
        # gradient for every parameter
        absent = [p.sum() for k, head in enumerate(self.heads) if k not in present for p in head.parameters()]
        out["zero"] = torch.stack(absent).sum() * 0.0 if absent else features.new_zeros(())
        return out

    def _routed(
        self, features: torch.Tensor, mask: torch.Tensor, fold: torch.Tensor, present: list[int]
    ) -> dict[str, torch.Tensor]:
        """Each fold's bags through its head, the outputs put back in batch order."""
        out: dict[str, torch.Tensor] = {}
        for k in present:
            idx = (fold == k).nonzero().squeeze(1)
            part = self.heads[k](features[idx], mask[idx])
            for name, value in part.items():
                if name not in out:
                    out[name] = value.new_zeros((features.shape[0], *value.shape[1:]))
                out[name] = out[name].index_copy(0, idx, value)
        return out

    def snapshot(self, k: int) -> None:
        """Keep fold ``k``'s current weights as its best."""
        self.best[k].load_state_dict(self.heads[k].state_dict())
        self.has_best[k] = True

    def head_for_inference(self, k: int) -> MILHead:
        """Fold ``k``'s weights at its best validation loss, or its last ones when it never validated."""
        return self.best[k] if bool(self.has_best[k]) else self.heads[k]
