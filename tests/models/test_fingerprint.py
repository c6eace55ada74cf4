"""The weights fingerprint: the digest every feature file, map and label map is keyed on must never change."""

from __future__ import annotations

import hashlib

import torch

from foundation.models.fingerprint import weights_fingerprint


def _reference(state: dict[str, torch.Tensor]) -> str:
    """The first implementation (hashing a bytes copy of each tensor): files written by it stay complete."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def test_digest_is_unchanged_for_every_kind_of_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "w": base,
        "w_t": base.t(),  # not contiguous
        "half": base.to(torch.bfloat16),
        "double": base.double()[:, 1:3],
        "mask": base > 0,
        "index": torch.arange(7),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    assert weights_fingerprint(state) == _reference(state)


def test_digest_is_pinned() -> None:
    """Digests computed by the released versions (a change here makes every existing output look stale)."""
    assert weights_fingerprint({"a": torch.zeros(2)}) == "a1cfa5c6f300f036"
    assert (
        weights_fingerprint({"a": torch.arange(3), "b": torch.ones(2, dtype=torch.bfloat16)})
        == "5d36b3f121ed75e2"
    )


def test_digest_of_a_model_equals_that_of_its_state_dict() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert (
        weights_fingerprint(model)
        == weights_fingerprint(model.state_dict())
        == _reference(model.state_dict())
    )
