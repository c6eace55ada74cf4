"""Masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377).

The encoder (our :class:`~foundation.models.vit.ViT`) sees only the visible patches; a light decoder gets
the encoded visible tokens plus a shared mask token at every removed position, and regresses the pixels of
the masked patches. Unlike the public MAE code, patches may have any channel count and be 2D or 3D.

Notation: B batch, C channels, p patch size, d spatial dims (2 or 3), N = prod(grid) patches,
K visible patches, P prefix tokens (CLS + registers), E encoder width, D decoder width, L = p^d * C.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from foundation.config import CropsConfig, SSLConfig
from foundation.models.pos_embed import sincos_pos_embed
from foundation.models.vit import ViT
from foundation.ssl.masking import random_masking_indices

# Added to the per-patch variance before the square root when normalising targets (as in MAE).
NORM_PIX_EPS = 1e-6
# timm passes device/dtype keywords to its norm layers, so a partial rather than a plain function.
_layer_norm = partial(nn.LayerNorm, eps=1e-6)


# -- patches <-> images ------------------------------------------------------------------------------------
def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut an image or volume into flattened patches, in the backbone's token order.

    Patches are ordered row-major over the grid, as timm's ``PatchEmbed`` (H', W') and our ``PatchEmbed3d``
    (D', H', W') flatten them, so row n is the target for token n. Within a patch the values are ordered
    (pixel row-major, then channel).

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        patch_size: Side length p of the square/cubic patches.

    Returns:
        ``(B, N, p^d * C)``.

    Raises:
        ValueError: the input is not 4-D or 5-D, or a spatial size is not divisible by ``patch_size``.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"patchify expects (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size!r}")
    b, c, *spatial = x.shape
    if any(s % patch_size for s in spatial):
        raise ValueError(
            f"spatial size {tuple(spatial)} is not divisible by the patch size {patch_size}; "
            "crop or resize to a multiple of the patch size"
        )
    d = len(spatial)
    grid = [s // patch_size for s in spatial]
    # (B, C, g1, p, g2, p[, g3, p]) -> (B, g1, g2[, g3], p, p[, p], C)
    split = [b, c] + [v for g in grid for v in (g, patch_size)]
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.reshape(split).permute(perm).reshape(b, math.prod(grid), patch_size**d * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, ...], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p^d * C)`` back to ``(B, C, *[g * p for g in grid])``.

    Args:
        patches: Flattened patches in the backbone's token order.
        patch_size: Side length p.
        grid: Patch grid, ``(H', W')`` or ``(D', H', W')``.
        channels: C; needed because L alone cannot tell p^d from C.

    Raises:
        ValueError: the shapes do not agree with ``grid``, ``patch_size`` and ``channels``.
    """
    grid = tuple(int(g) for g in grid)
    d = len(grid)
    if d not in (2, 3):
        raise ValueError(f"grid must have 2 or 3 axes, got {grid!r}")
    expected = (math.prod(grid), patch_size**d * channels)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match grid {grid}, patch size {patch_size} and "
            f"{channels} channels (expected (B, {expected[0]}, {expected[1]}))"
        )
    b = patches.shape[0]
    x = patches.reshape(b, *grid, *([patch_size] * d), channels)
    # (B, g1, g2[, g3], p, p[, p], C) -> (B, C, g1, p, g2, p[, g3, p])
    perm = [0, 2 * d + 1] + [v for i in range(d) for v in (1 + i, 1 + d + i)]
    return x.permute(perm).reshape(b, channels, *[g * patch_size for g in grid])


# -- loss --------------------------------------------------------------------------------------------------
def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
    """MAE's reconstruction loss: mean squared error over the masked patches only, in float32.

    Visible patches are excluded because copying them is trivial and would dilute the signal (MAE, Sec. 3).

    Args:
        pred: Decoder output ``(B, N, L)``.
        target: :func:`patchify` of the input ``(B, N, L)``.
        mask: ``(B, N)`` bool, True = masked (the patches that count).
        norm_pix: Normalise each target patch by its own mean and std, which the paper finds gives
            better representations.

    Returns:
        Scalar: sum over masked patches of the per-patch mean squared error, divided by their number.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} do not agree"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            # Unbiased variance (torch's default), as the MAE reference does; a single-value patch has no
            # unbiased variance, so fall back to the biased one (0) there rather than produce NaN.
            var = target.var(dim=-1, keepdim=True) if target.shape[-1] > 1 else torch.zeros_like(mean)
            target = (target - mean) / torch.sqrt(var + NORM_PIX_EPS)
        per_patch = (pred - target).pow(2).mean(dim=-1)
        weights = mask.to(per_patch.dtype)
        return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


# -- masking -----------------------------------------------------------------------------------------------
def seeded_masking(
    seeds: Tensor | None, batch: int, num_tokens: int, mask_ratio: float, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masks, each from its own CPU generator seeded by the data.

    A mask that depends only on the sample's seed is the same on any number of ranks and after a resume;
    without seeds the global RNG on ``device`` is used (not reproducible across rank counts).

    Args:
        seeds: ``(B,)`` int64 per-sample seeds (``batch["mask_seed"]``), or None.
        batch: B.
        num_tokens: N.
        mask_ratio: Fraction of patches to mask, in (0, 1).
        device: Where the returned indices live.

    Returns:
        ``keep_idx (B, K)``, ``mask (B, N)`` bool (True = masked) and ``restore_idx (B, N)``, as
        :func:`~foundation.ssl.masking.random_masking_indices`.
    """
    if seeds is None:
        return random_masking_indices(batch, num_tokens, mask_ratio, None, device)
    seeds = torch.as_tensor(seeds).reshape(-1)
    if seeds.numel() != batch:
        raise ValueError(f"batch['mask_seed'] has {seeds.numel()} seeds for a batch of {batch} samples")
    parts = [
        random_masking_indices(1, num_tokens, mask_ratio, torch.Generator().manual_seed(int(s)), "cpu")
        for s in seeds.tolist()  # one device sync for all seeds
    ]
    keep_idx, mask, restore_idx = (torch.cat(t).to(device) for t in zip(*parts, strict=True))
    return keep_idx, mask, restore_idx


class MAEMaskSeeds:
    """Per-sample extra for the data pipeline: one mask seed per sample, stacked to ``(B,)`` by the loader.

    Seeds are drawn in the pipeline (from its resumable generator) rather than in the model, so the mask
    of a sample does not depend on the rank it lands on or on the global RNG.
    """

    def __call__(self, views: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        return {"mask_seed": torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64)}


# -- decoder -----------------------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """Light transformer that fills in mask tokens and predicts the pixels of every patch.

    Position embeddings are fixed sin-cos (MAE) so any grid works without interpolation; they are a
    non-persistent buffer for the backbone's default grid and computed and cached for other grids.
    """

    def __init__(
        self,
        encoder_dim: int,
        decoder_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        in_chans: int,
        spatial_dims: int,
        num_prefix_tokens: int,
        grid: tuple[int, ...] | None = None,
    ) -> None:
        """Build the decoder.

        Args:
            encoder_dim: E, width of the encoder's tokens.
            decoder_dim: D.
            depth: Number of transformer blocks.
            num_heads: Attention heads per block.
            patch_size: p.
            in_chans: C, channels of the reconstructed patches.
            spatial_dims: d, 2 or 3.
            num_prefix_tokens: P, the CLS + register tokens at the front of the encoder output.
            grid: The usual patch grid; its position embedding is precomputed as a buffer.
        """
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(
                f"ssl.decoder_dim={decoder_dim} is not divisible by ssl.decoder_heads={num_heads}"
            )
        self.decoder_dim = decoder_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_dim = patch_size**spatial_dims * in_chans
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.blocks = nn.Sequential(
            *[
                Block(decoder_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=_layer_norm)
                for _ in range(depth)
            ]
        )
        self.norm = _layer_norm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, self.patch_dim)
        self.grid = tuple(grid) if grid is not None else None
        pos = sincos_pos_embed(decoder_dim, self.grid)[None] if self.grid is not None else torch.zeros(0)
        # Fixed, derived from the grid: not trained and not saved, so checkpoints do not depend on the grid.
        self.register_buffer("pos_embed", pos, persistent=False)
        self._pos_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier keeps the activation scale of the freshly initialised decoder independent of its width.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def position_embedding(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """Sin-cos embedding ``(1, N, D)`` for ``grid``, from the buffer or a per-grid cache."""
        grid = tuple(int(g) for g in grid)
        if grid == self.grid and self.pos_embed.device == device:
            return self.pos_embed
        key = (grid, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(self.decoder_dim, grid)[None].to(device)
        return self._pos_cache[key]

    def forward(self, tokens: Tensor, restore_idx: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Predict every patch from the encoded visible ones.

        Args:
            tokens: Encoder output ``(B, P + K, E)``: prefix tokens then the visible patches in keep order.
            restore_idx: ``(B, N)``; gathering ``[visible, mask tokens]`` with it restores the grid order.
            grid: The patch grid, ``prod(grid) == N``.

        Returns:
            ``(B, N, p^d * C)`` predictions in the backbone's patch order.
        """
        b, n = restore_idx.shape
        if math.prod(grid) != n:
            raise ValueError(f"restore_idx has {n} tokens but the grid {tuple(grid)} has {math.prod(grid)}")
        p = self.num_prefix_tokens
        x = self.embed(tokens)
        prefix, visible = x[:, :p], x[:, p:]
        n_masked = n - visible.shape[1]
        if n_masked < 0:
            raise ValueError(f"{visible.shape[1]} visible tokens but only {n} patches")
        patches = torch.cat([visible, self.mask_token.to(x.dtype).expand(b, n_masked, -1)], dim=1)
        patches = torch.gather(patches, 1, restore_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        patches = patches + self.position_embedding(grid, x.device).to(x.dtype)
        # Prefix tokens take part in attention (they carry global context) but predict nothing.
        x = self.norm(self.blocks(torch.cat([prefix, patches], dim=1)))
        return self.pred(x[:, p:])


# -- objective ---------------------------------------------------------------------------------------------
class MAE(nn.Module):
    """Encoder (the backbone) + decoder + masked pixel loss.

    ``forward(batch, step)`` returns ``{"loss", "mse"}``. The batch holds ``image`` ``(B, C, H, W)`` or
    ``(B, C, D, H, W)`` and, from :class:`MAEMaskSeeds`, ``mask_seed`` ``(B,)``.
    """

    backbone_prefix = "encoder."
    export_prefix = "encoder."

    def __init__(self, backbone: ViT, cfg: SSLConfig, total_steps: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.total_steps = total_steps  # unused: MAE has no schedules of its own; kept for a uniform API
        self.encoder = backbone
        self.decoder = MAEDecoder(
            encoder_dim=backbone.embed_dim,
            decoder_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            patch_size=backbone.patch_size,
            in_chans=backbone.in_chans,
            spatial_dims=backbone.spatial_dims,
            num_prefix_tokens=backbone.num_prefix_tokens,
            grid=tuple(backbone.patch_embed.grid_size),
        )

    @property
    def student_backbone(self) -> ViT:
        return self.encoder

    def export_backbone(self) -> ViT:
        """The encoder: MAE has no teacher, the trained weights are the features."""
        return self.encoder

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def _check_image(self, image: Tensor) -> None:
        enc = self.encoder
        if image.ndim != 2 + enc.spatial_dims:
            raise ValueError(
                f"batch['image'] has shape {tuple(image.shape)}; the {enc.spatial_dims}D backbone expects "
                f"{2 + enc.spatial_dims}-D input (B, C, {'D, ' if enc.spatial_dims == 3 else ''}H, W)"
            )
        if image.shape[1] != enc.in_chans:
            raise ValueError(
                f"batch['image'] has {image.shape[1]} channels but the backbone has in_chans={enc.in_chans}: "
                "the backbone's channel count does not match the data"
            )

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        image = batch["image"]
        self._check_image(image)
        target = patchify(image.float(), self.encoder.patch_size)  # also checks divisibility
        b, n = target.shape[:2]
        keep_idx, mask, restore_idx = seeded_masking(
            batch.get("mask_seed"), b, n, self.cfg.mask_ratio, image.device
        )
        tokens, grid = self.encoder.forward_visible(image, keep_idx)
        pred = self.decoder(tokens, restore_idx, grid)
        loss = masked_patch_loss(pred, target, mask, self.cfg.norm_pix_loss)
        # MAE drops masked patches instead of replacing them, so the encoder's mask token (iBOT's) never reaches
        # the loss, and DDP, waiting for a gradient of every parameter, stopped at the second step. A zero term
        # gives it an exact zero gradient: the loss is unchanged, AdamW leaves the token as it is (it has no
        # weight decay), and the optimiser's parameter list, so every checkpoint's layout, stays the same.
        unused = self.encoder.mask_token.sum() * 0.0
        return {"loss": loss + unused, "mse": loss.detach()}

    def update_teacher(self, step: int) -> dict[str, float]:
        """Nothing to do: MAE has no teacher."""
        return {}


def make_mae(backbone: ViT, cfg: SSLConfig, crops: CropsConfig, total_steps: int) -> tuple[MAE, MAEMaskSeeds]:
    """The objective and the per-sample extra it needs from the data (mask seeds)."""
    return MAE(backbone, cfg, total_steps), MAEMaskSeeds()
