"""The one ViT family every domain uses: timm's VisionTransformer plus 3D patches, mask tokens and MAE's
visible-token path.

The 2D state dict is exactly timm's (``no_embed_class=True``, learned patch position embeddings), so an
exported backbone loads with ``timm.create_model`` and no project code. See ViT (arXiv 2010.11929),
registers (arXiv 2309.16588), DINOv2 (arXiv 2304.07193).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from foundation.errors import ConfigError
from foundation.models.patch_embed import PatchEmbed3d
from foundation.models.pos_embed import resample_pos_embed

# name -> (embed_dim, depth, num_heads); giant uses a plain MLP (ratio 4), not DINOv2's SwiGLU
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1536, 40, 24),
}


class ViT(VisionTransformer):
    """timm ``VisionTransformer`` with 2D or 3D patches, iBOT mask tokens and a visible-only forward (MAE).

    Tokens are ``[CLS, registers..., patches...]``; position embeddings cover the patches only and are
    interpolated to the input's grid, so any input size divisible by the patch size works.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        spatial_dims: int = 2,
        reg_tokens: int = 0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        init_weights: bool = True,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} must be 2 or 3")
        self.timm_args: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            init_values=init_values,
            reg_tokens=reg_tokens,
            no_embed_class=True,
            class_token=True,
            dynamic_img_size=True,
            num_classes=0,
            global_pool="token",
        )
        # init_weights=False when weights are loaded next: timm's initialisation of a large ViT takes seconds
        weight_init = "" if init_weights else "skip"
        super().__init__(**self.timm_args, drop_path_rate=drop_path_rate, weight_init=weight_init)
        self.spatial_dims = spatial_dims
        if spatial_dims == 3:
            self.patch_embed = PatchEmbed3d(img_size, patch_size, in_chans, embed_dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            if init_weights:
                trunc_normal_(self.pos_embed, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_size = patch_size
        self.in_chans = in_chans

    # -- token preparation -------------------------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens ``(B, N, E)`` without position embeddings, and the patch grid."""
        expected = 2 + self.spatial_dims
        if x.ndim != expected or x.shape[1] != self.in_chans:
            raise ValueError(
                f"backbone expects {expected}-D input with {self.in_chans} channels, got shape {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.patch_size]
        if bad:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} is not divisible by the patch size {self.patch_size}"
            )
        tokens = self.patch_embed(x)
        grid = tuple(tokens.shape[1:-1])
        return tokens.flatten(1, -2), grid

    def patch_pos_embed(self, grid: tuple[int, ...]) -> torch.Tensor:
        return resample_pos_embed(self.pos_embed, tuple(self.patch_embed.grid_size), grid)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        parts = [self.cls_token.expand(batch, -1, -1)]
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(batch, -1, -1))
        return torch.cat(parts, dim=1)

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple]:
        """``[CLS, regs, patches + pos]``; patches where ``masks`` (B, N) is True become the mask token."""
        tokens, grid = self.embed_patches(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.patch_pos_embed(grid)
        return torch.cat([self.prefix_tokens(x.shape[0]), tokens], dim=1), grid

    def _run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.norm_pre(tokens)))

    # -- forwards ------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``(B, 1 + R + N, E)``."""
        tokens, _ = self.prepare_tokens(x, masks)
        return self._run_blocks(tokens)

    def forward_dict(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CLS ``(B, E)``, registers ``(B, R, E)`` and patch tokens ``(B, N, E)``, all normalised."""
        out = self.forward_features(x, masks)
        p = self.num_prefix_tokens
        return {"cls": out[:, 0], "registers": out[:, 1:p], "patch": out[:, p:]}

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """MAE encoder: only the patches in ``keep_idx`` (B, K) enter the blocks (arXiv 2111.06377)."""
        tokens, grid = self.embed_patches(x)
        tokens = tokens + self.patch_pos_embed(grid)
        idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        visible = torch.gather(tokens, 1, idx)
        return self._run_blocks(torch.cat([self.prefix_tokens(x.shape[0]), visible], dim=1)), grid

    def get_intermediate_layers(
        self, x: torch.Tensor, indices: list[int], norm: bool = True
    ) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """Patch tokens ``(B, N, E)`` after the given blocks (for dense heads such as DPT/UNETR), and the grid."""
        depth = len(self.blocks)
        indices = [i + depth if i < 0 else i for i in indices]
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a backbone of depth {depth}")
        tokens, grid = self.prepare_tokens(x)
        tokens = self.norm_pre(tokens)
        wanted, outs = set(indices), {}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in wanted:
                outs[i] = (self.norm(tokens) if norm else tokens)[:, self.num_prefix_tokens :]
            if len(outs) == len(wanted):
                break
        return [outs[i] for i in indices], grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS embedding ``(B, E)``, like a timm model with ``num_classes=0``."""
        return self.forward_features(x)[:, 0]

    # -- optimisation helpers ------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, final norm depth + 1."""
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def build_vit(
    arch: str,
    *,
    in_chans: int,
    spatial_dims: int = 2,
    img_size: int = 224,
    patch_size: int = 16,
    reg_tokens: int = 0,
    drop_path_rate: float = 0.0,
    init_values: float | None = None,
    qkv_bias: bool = True,
    init_weights: bool = True,
) -> ViT:
    """Build a backbone by name (``vit_tiny`` ... ``vit_giant``); ``init_weights=False`` when loading weights."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is not one of {sorted(ARCHS)}")
    embed_dim, depth, heads = ARCHS[arch]
    return ViT(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        spatial_dims=spatial_dims,
        reg_tokens=reg_tokens,
        drop_path_rate=drop_path_rate,
        init_values=init_values,
        qkv_bias=qkv_bias,
        init_weights=init_weights,
    )
