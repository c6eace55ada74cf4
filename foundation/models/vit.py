"""The one ViT family every domain uses: a timm ``VisionTransformer`` (any variant timm builds) plus 3D
patches, iBOT mask tokens and MAE's visible-token path.

A backbone is a timm architecture name plus its ``model_args`` (what timm's config.json holds). The 2D token
and position logic is timm's own ``_pos_embed`` (CLS position or not, registers, no class token, dynamic
size), so the same weights give timm's numbers, and the state dict is timm's, so an export loads with
``timm.create_model`` and no project code. See ViT (arXiv 2010.11929), registers (arXiv 2309.16588),
DINOv2 (arXiv 2304.07193), MAE (arXiv 2111.06377).
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.errors import ConfigError
from foundation.models.patch_embed import PatchEmbed3d
from foundation.models.pos_embed import resample_pos_embed

# recipe name -> (embed_dim, depth, num_heads); giant uses a plain MLP (ratio 4), not DINOv2's SwiGLU
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1536, 40, 24),
}
# the registered timm entry point a recipe is exported as; its model_args override every shape argument
RECIPE_TIMM_NAME = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_giant": "vit_giant_patch14_224",
}
TIMM_PREFIX = "timm:"


def timm_arch_name(arch: str) -> str | None:
    """``"timm:NAME"`` -> ``NAME`` (a pretrained tag such as ``.lvd142m`` dropped); a recipe -> None."""
    if not arch.startswith(TIMM_PREFIX):
        return None
    return arch[len(TIMM_PREFIX) :].split(".")[0]


def check_timm_name(name: str, where: str = "model.arch") -> None:
    """Refuse a name timm has not registered, with the closest registered names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(
            f"{where}: timm has no architecture {name!r}"
            + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models('vit_*')")
        )


class ViT(VisionTransformer):
    """timm ``VisionTransformer`` with 2D or 3D patches, iBOT mask tokens and a visible-only forward (MAE).

    Tokens are ``[CLS?, registers..., patches...]`` as in timm. Built only by :meth:`from_timm`: timm's entry
    points hold each variant's layers (SwiGLU, norms, eps) in code, not data, so the instance timm builds is
    extended in place rather than rebuilt from a copy of its arguments.
    """

    spatial_dims: int
    timm_name: str
    timm_args: dict[str, Any]
    patch_size: int

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        drop_path_rate: float = 0.0,
        init_weights: bool = True,
        timm_name: str = "vit_base_patch16_224",
        **model_args: Any,
    ) -> None:
        """A variant given by its full timm ``VisionTransformer`` kwargs (JSON values), ``VisionTransformer(
        **model_args)`` itself; ``timm_name`` is the registered entry point an export names. Variants whose
        layers only an entry point knows (SwiGLU, RmsNorm) are built with :meth:`from_timm`."""
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} must be 2 or 3")
        args = {**model_args, "num_classes": 0, "dynamic_img_size": spatial_dims == 2}
        if spatial_dims == 3:
            args["no_embed_class"] = True
        try:
            super().__init__(
                **args, drop_path_rate=drop_path_rate, weight_init="" if init_weights else "skip"
            )
        except (TypeError, AssertionError, ValueError) as e:
            raise ConfigError(f"VisionTransformer refuses model_args {args}: {e}") from e
        self._extend(timm_name, args, spatial_dims, init_weights)

    @classmethod
    def from_timm(
        cls,
        name: str,
        model_args: dict[str, Any],
        *,
        spatial_dims: int = 2,
        drop_path_rate: float = 0.0,
        init_weights: bool = True,
    ) -> ViT:
        """Build timm's ``name`` with ``model_args`` (no classifier, dynamic input size) and extend it.

        Raises:
            ConfigError: unknown name, arguments timm refuses, or not a plain VisionTransformer.
        """
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} must be 2 or 3")
        check_timm_name(name)
        args = {**model_args, "num_classes": 0, "dynamic_img_size": spatial_dims == 2}
        if spatial_dims == 3:
            args["no_embed_class"] = True  # 3D positions cover the patches only
        # init_weights=False when weights are loaded next: timm's initialisation of a large ViT takes seconds
        try:
            model = timm.create_model(
                name,
                pretrained=False,
                drop_path_rate=drop_path_rate,
                weight_init="" if init_weights else "skip",
                **args,
            )
        except (TypeError, AssertionError, ValueError) as e:
            raise ConfigError(f"timm architecture {name!r} refuses model_args {args}: {e}") from e
        if type(model) is not VisionTransformer:
            raise ConfigError(
                f"timm architecture {name!r} is a {type(model).__name__}, not a VisionTransformer"
            )
        model.__class__ = cls
        model._extend(name, args, spatial_dims, init_weights)
        return model

    def _extend(self, name: str, args: dict[str, Any], spatial_dims: int, init_weights: bool) -> None:
        patch = tuple(self.patch_embed.patch_size)
        if len(set(patch)) != 1:
            raise ConfigError(f"timm architecture {name!r}: patch size {patch} is not square")
        self.timm_name, self.timm_args, self.spatial_dims = name, args, spatial_dims
        self.patch_size = int(patch[0])
        if spatial_dims == 3:
            img = int(self.patch_embed.img_size[0])
            self.patch_embed = PatchEmbed3d(img, self.patch_size, self.in_chans, self.embed_dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, self.embed_dim))
            if init_weights:
                trunc_normal_(self.pos_embed, std=0.02)
        if init_weights and self.no_embed_class and self.cls_token is not None:
            # DINOv2's CLS starts as its token (std 1e-6) plus its own position embedding (std 0.02). With no
            # CLS position, timm's 1e-6 token alone starts the CLS stream ~1e4 times smaller than the patch
            # tokens: the final norm then scales its gradients by ~1e5 (grad norm 5e4 at step 0) and Adam's
            # first steps fill it with one image-independent value, so every image gets the same DINO
            # target. Start it at the scale of the embedding it stands for.
            trunc_normal_(self.cls_token, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    # -- token preparation -------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
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

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens ``(B, N, E)`` without position embeddings, and the patch grid."""
        self._check_input(x)
        tokens = self.patch_embed(x)
        return tokens.flatten(1, -2), tuple(tokens.shape[1:-1])

    def patch_pos_embed(self, grid: tuple[int, ...]) -> torch.Tensor:
        """The position embeddings of the patches (prefix positions left out) on ``grid``."""
        old = tuple(self.patch_embed.grid_size)
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_pos_embed(self.pos_embed[:, prefix:], old, tuple(grid))

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """``[CLS?, registers...]`` ``(B, P, E)``; P may be 0 (no class token, no registers)."""
        parts = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if not parts:
            return self.mask_token.new_zeros(batch, 0, self.embed_dim)
        return torch.cat(parts, dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patches ``(B, *grid, E)`` -> all tokens: timm's own logic in 2D, patch-only positions in 3D."""
        if self.spatial_dims == 2:
            return super()._pos_embed(x)
        grid = tuple(x.shape[1:-1])
        x = x.flatten(1, -2) + self.patch_pos_embed(grid)
        return self.pos_drop(torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1))

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple]:
        """All tokens with positions; patches where ``masks`` (B, N) is True become the mask token first."""
        self._check_input(x)
        tokens = self.patch_embed(x)
        grid = tuple(tokens.shape[1:-1])
        if masks is not None:
            keep_shape = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)
            tokens = torch.where(keep_shape, self.mask_token.to(tokens.dtype), tokens)
        return self._pos_embed(tokens), grid

    def _run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm_pre(tokens)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # timm's switch (set_grad_checkpointing): each block's activations are recomputed in backward
            for block in self.blocks:
                tokens = checkpoint(block, tokens, use_reentrant=False)
            return self.norm(tokens)
        return self.norm(self.blocks(tokens))

    # -- forwards ------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``(B, P + N, E)``: timm's ``forward_features``."""
        tokens, _ = self.prepare_tokens(x, masks)
        return self._run_blocks(self.patch_drop(tokens))

    def split_tokens(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward_features`` output -> ``cls`` (timm's pooled output), ``registers`` and ``patch``.

        ``cls`` is ``forward_head(pre_logits=True)``: the CLS token for token pooling, the pooled (and
        fc-normed) patches for ``global_pool='avg'`` or a model without a class token.
        """
        c, p = int(self.has_class_token), self.num_prefix_tokens
        return {"cls": self.forward_head(out, pre_logits=True), "registers": out[:, c:p], "patch": out[:, p:]}

    def forward_dict(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CLS ``(B, E)``, registers ``(B, R, E)`` and patch tokens ``(B, N, E)``."""
        return self.split_tokens(self.forward_features(x, masks))

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """MAE encoder: only the patches in ``keep_idx`` (B, K) enter the blocks, after their positions."""
        tokens, grid = self.prepare_tokens(x)
        p = self.num_prefix_tokens
        idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        visible = torch.gather(tokens[:, p:], 1, idx)
        return self._run_blocks(torch.cat([tokens[:, :p], visible], dim=1)), grid

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
        """The pooled embedding ``(B, E)``, like a timm model with ``num_classes=0``."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    # -- optimisation helpers ------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "norm_pre")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def recipe_model_args(
    arch: str,
    *,
    in_chans: int,
    img_size: int,
    patch_size: int,
    reg_tokens: int,
    init_values: float | None,
    qkv_bias: bool,
) -> dict[str, Any]:
    """The full timm ``model_args`` of a named recipe (learned patch-only positions, CLS token pooling)."""
    embed_dim, depth, heads = ARCHS[arch]
    return dict(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=qkv_bias,
        init_values=init_values,
        reg_tokens=reg_tokens,
        no_embed_class=True,
        class_token=True,
        global_pool="token",
    )


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
    model_args: dict[str, Any] | None = None,
    init_weights: bool = True,
) -> ViT:
    """Build a backbone: a recipe (``vit_tiny`` ... ``vit_giant``) or ``timm:NAME`` with ``model_args``.

    A timm architecture keeps its own defaults; ``reg_tokens``/``init_values``/``qkv_bias`` belong to the
    recipes (change a timm variant through ``model_args``). ``init_weights=False`` when loading weights.
    """
    name = timm_arch_name(arch)
    if name is not None:
        args = {**(model_args or {}), "in_chans": in_chans, "img_size": img_size, "patch_size": patch_size}
    elif arch in ARCHS:
        name = RECIPE_TIMM_NAME[arch]
        args = recipe_model_args(
            arch,
            in_chans=in_chans,
            img_size=img_size,
            patch_size=patch_size,
            reg_tokens=reg_tokens,
            init_values=init_values,
            qkv_bias=qkv_bias,
        )
        args.update(model_args or {})
    else:
        raise ConfigError(
            f"model.arch={arch!r} is not one of {sorted(ARCHS)} nor 'timm:NAME' (a timm VisionTransformer)"
        )
    return ViT.from_timm(
        name, args, spatial_dims=spatial_dims, drop_path_rate=drop_path_rate, init_weights=init_weights
    )


def build_vit_to_load(**backbone_args: Any) -> ViT:
    """``build_vit(**backbone_args, init_weights=False)`` for weights that are loaded next, without its cost.

    Built on the meta device, then given uninitialised CPU storage (``to_empty``): PyTorch's default init of
    every layer (0.2-0.4 s for a ViT-B on one thread, seconds for a ViT-g) would only be overwritten. The
    parameters a file may lack get the values the plain build gives them: ``mask_token`` and ``reg_token``
    zeros (timm's ``weight_init="skip"`` leaves its zeros). Every other parameter and buffer must then be
    loaded: the callers refuse a file that lacks one (``load_state_dict`` copies into this storage, so the
    dtype stays the model's and nothing aliases the file's tensors). A model holding state no file carries
    (a non-persistent buffer or a plain tensor attribute) is built the plain way instead.
    """
    with torch.device("meta"):
        model = build_vit(**backbone_args, init_weights=False)
    persistent = set(model.state_dict())
    unsaved = [n for n, _ in model.named_buffers() if n not in persistent] + [
        f"{name}.{attr}" if name else attr
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
    ]
    if unsaved:
        return build_vit(**backbone_args, init_weights=False)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for token in (model.mask_token, model.reg_token):
            if token is not None:
                token.zero_()
    return model


def resolve_timm_backbone_args(
    name: str, model_args: dict[str, Any], *, in_chans: int | None = None
) -> dict[str, Any]:
    """``backbone_args`` of timm's ``name`` + ``model_args``, with its input size and patch size read from the
    variant timm builds (on the meta device: no memory, no initialisation)."""
    args = dict(model_args)
    if in_chans is not None:
        args["in_chans"] = in_chans
    with torch.device("meta"):
        model = ViT.from_timm(name, args, init_weights=False)
    return dict(
        arch=f"{TIMM_PREFIX}{name}",
        in_chans=int(model.in_chans),
        spatial_dims=2,
        img_size=int(model.patch_embed.img_size[0]),
        patch_size=model.patch_size,
        model_args={k: v for k, v in model_args.items() if k not in ("in_chans", "img_size", "patch_size")},
    )
