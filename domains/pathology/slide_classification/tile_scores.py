"""Per-tile scores of one fold's head: attention, and a class probability for every tile.

The class probability of a tile comes from CLAM's instance classifiers when the model has them
(``instance_loss: true``): ``P(tile is of class c)`` from class ``c``'s in/out classifier. Otherwise it is the
slide classifier applied to the tile alone, ``softmax(W h_i + b)``: since the slide's logits are
``W (sum_i a_i h_i) + b = sum_i a_i (W h_i + b)`` (attention sums to 1), the slide's logits are exactly the
attention-weighted mean of these tile logits, so a tile's probability says what it pushes the slide towards.
"""

from __future__ import annotations

import torch

from foundation_domains.pathology.slide_classification.model import MILHead

INSTANCE = "instance_classifier"  # CLAM's per-class tile classifiers
SLIDE_CLASSIFIER = "slide_classifier_per_tile"  # the bag classifier on each tile's embedding


def class_score_source(head: MILHead) -> str:
    """Where :func:`tile_scores` takes the tiles' class probabilities from for this head."""
    return INSTANCE if head.instance is not None else SLIDE_CLASSIFIER


@torch.no_grad()
def tile_scores(head: MILHead, features: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"probs": C, "attention": N, "tile_probs": N x C}`` on the CPU for one ``N x D`` bag, evaluated whole."""
    head.eval()
    x = features.to(device).unsqueeze(0)
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
    out = head(x, mask)
    if head.instance is not None:  # N x C x 2, index 1 = "of this class" (what the instance loss trains)
        tile_probs = torch.softmax(out["tile_logits"][0].float(), -1)[..., 1]
    else:
        tile_probs = torch.softmax(head.classifier(head.embed(x))[0].float(), -1)
    return {
        "probs": torch.softmax(out["logits"][0].float(), 0).cpu(),
        "attention": out["attention"][0].float().cpu(),
        "tile_probs": tile_probs.cpu(),
    }
