"""One whole bag through one fold's head (validation and evaluation share it)."""

from __future__ import annotations

import torch

from foundation_domains.pathology.slide_classification.model import MILHead


@torch.no_grad()
def run_bag(head: MILHead, features: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"logits": C, "probs": C, "attention": N}`` on the CPU for one ``N x D`` bag, evaluated whole."""
    x = features.to(device).unsqueeze(0)
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
    out = head(x, mask)
    logits = out["logits"][0].float().cpu()
    return {
        "logits": logits,
        "probs": torch.softmax(logits, 0),
        "attention": out["attention"][0].float().cpu(),
    }
