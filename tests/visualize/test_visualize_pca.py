"""PCA of patch tokens: one fit over all inputs, background cut at the first component, border picks the side."""

from __future__ import annotations

import torch

from foundation.visualize.pca import border_mask, fit_patch_pca


def _tokens(seed: int, grid=(6, 6), dim=16) -> tuple[torch.Tensor, torch.Tensor]:
    """Background tokens around a 2x2..4x4 foreground block of another cluster, with two foreground parts."""
    g = torch.Generator().manual_seed(seed)
    bg, part_a, part_b = (torch.randn(dim, generator=g) * 4 for _ in range(3))
    fg = torch.zeros(grid, dtype=torch.bool)
    fg[1:5, 1:5] = True
    tokens = bg + 0.1 * torch.randn(*grid, dim, generator=g)
    tokens[1:5, 1:3] = part_a + 0.1 * torch.randn(4, 2, dim, generator=g)
    tokens[1:5, 3:5] = part_b + 0.1 * torch.randn(4, 2, dim, generator=g)
    return tokens.reshape(-1, dim), fg.flatten()


def test_border_mask() -> None:
    assert border_mask((3, 4)).reshape(3, 4).tolist() == [
        [True] * 4,
        [True, False, False, True],
        [True] * 4,
    ]
    assert int(border_mask((3, 3, 3)).sum()) == 26


def test_background_removed_and_foreground_coloured() -> None:
    tokens, fg = _tokens(0)
    pca = fit_patch_pca([tokens, tokens.clone()], [(6, 6), (6, 6)])
    assert pca.background_removed
    assert torch.equal(pca.foreground[0], fg)
    assert torch.all(pca.rgb[0][~fg] == 0)
    assert pca.rgb[0].min() >= 0 and pca.rgb[0].max() <= 1
    # the two foreground parts get different colours; one fit: the same token gets the same colour
    assert (pca.rgb[0][7] - pca.rgb[0][10]).abs().max() > 0.3
    torch.testing.assert_close(pca.rgb[0], pca.rgb[1])
    again = fit_patch_pca([tokens, tokens.clone()], [(6, 6), (6, 6)])
    torch.testing.assert_close(again.rgb[0], pca.rgb[0])


def test_keep_background_and_sign_flip() -> None:
    tokens, _ = _tokens(1)
    kept = fit_patch_pca([tokens], [(6, 6)], remove_background=False)
    assert not kept.background_removed and bool(kept.foreground[0].all())
    flipped = fit_patch_pca([-tokens], [(6, 6)])  # the first component's sign flips; the border decides
    assert torch.equal(flipped.foreground[0], fit_patch_pca([tokens], [(6, 6)]).foreground[0])
