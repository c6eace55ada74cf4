"""One MAE training step divided by the bare work, same process and dtype, 2D and 3D.

Ours: the engine's ``train_step`` with the MAE objective (per-sample seeded masking, encoder on visible
tokens, decoder on all tokens, normalised-pixel loss on masked patches, AdamW).
Baseline: timm ``Block``s doing the same matmuls with no objective around them: patch embedding, encoder
forward+backward on a fixed 25% of the tokens, decoder forward+backward on all tokens, a mean as the loss.

    python benchmarks/mae_step.py                    # ViT-B/16 encoder at 224 px, batch 8, then 3D at 96^3
    python benchmarks/mae_step.py --device cuda --dtype bf16 --batch 128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median  # noqa: E402

from foundation.config import load_config  # noqa: E402
from foundation.models.vit import ARCHS  # noqa: E402
from foundation.train.distributed import DistInfo  # noqa: E402
from foundation.train.engine import Trainer, ssl_setup  # noqa: E402


class BareMAE(nn.Module):
    def __init__(
        self, dims: int, chans: int, patch: int, dim: int, depth: int, heads: int, dec: tuple[int, int, int]
    ):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.embed = conv(chans, dim, patch, patch)
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        ddim, ddepth, dheads = dec
        self.dec_embed = nn.Linear(dim, ddim)
        self.dec_blocks = nn.Sequential(*[Block(ddim, dheads, qkv_bias=True) for _ in range(ddepth)])
        self.pred = nn.Linear(ddim, patch**dims * chans)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        latent = self.norm(self.blocks(visible))
        full = self.dec_embed(latent).repeat(1, tokens.shape[1] // keep.shape[1], 1)
        return self.pred(self.dec_blocks(full)).float().mean()


def run(args: argparse.Namespace, dims: int, size: int, patch: int, chans: int) -> dict:
    device = torch.device(args.device)
    overrides = [
        f"model.arch={args.arch}",
        f"model.patch_size={patch}",
        f"model.img_size={size}",
        "model.layerscale_init=null",
        f"model.spatial_dims={dims}",
        f"model.in_chans={chans}",
        "ssl.method=mae",
        f"ssl.decoder_dim={args.decoder_dim}",
        f"ssl.decoder_depth={args.decoder_depth}",
        "ssl.decoder_heads=16",
        f"data.crops.global_size={size}",
        f"train.batch_size={args.batch}",
        f"train.precision={args.dtype}",
        "train.steps=100",
        "optim.warmup_steps=5",
        "data.num_workers=0",
        "optim.clip_grad=null",
        "optim.layer_decay=1.0",
        "optim.freeze_last_layer_steps=0",
    ]
    cfg = load_config(None, overrides)
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    trainer = _trainer(cfg, Path(args.tmp), device, chans, dims)
    shape = (args.batch, chans) + (size,) * dims
    batch = {"image": torch.randn(shape, device=device), "mask_seed": torch.arange(args.batch, device=device)}

    embed_dim, depth, heads = ARCHS[args.arch]
    bare = BareMAE(
        dims, chans, patch, embed_dim, depth, heads, (args.decoder_dim, args.decoder_depth, 16)
    ).to(device)
    n = (size // patch) ** dims
    keep = torch.stack([torch.randperm(n)[: n // 4] for _ in range(args.batch)]).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        trainer.train_step(10, iter([batch]))
        sync()

    def baseline() -> None:
        with amp:
            loss = bare(batch["image"], keep)
        loss.backward()
        bare.zero_grad(set_to_none=True)
        sync()

    t = interleaved_median({"ours": ours, "bare": baseline}, args.repeats)
    return {
        "benchmark": "mae_step",
        "dims": dims,
        "size": size,
        "arch": args.arch,
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "ours_s": round(t["ours"], 4),
        "bare_s": round(t["bare"], 4),
        "ratio": round(t["ours"] / t["bare"], 3),
        "samples_s": round(args.batch / t["ours"], 2),
        "tokens": n,
        "visible": math.floor(n * 0.25),
    }


def _trainer(cfg, tmp: Path, device: torch.device, chans: int, dims: int) -> Trainer:
    """A Trainer whose domain matches the synthetic input (channels, dimensionality)."""
    from foundation import domain as registry
    from foundation.data.spec import DataSpec

    class Synthetic:
        name = "bench"
        default_spec = DataSpec(chans, dims, (0.0,) * chans, (1.0,) * chans)

        def make_sample(self, root):
            return str(root)

        def sample_source(self, path, cfg):
            return registry.DataSource(None, self.default_spec)

        def ssl_transform(self, cfg, spec):
            return None

    registry._REGISTRY["bench"] = Synthetic
    cfg.domain = "bench"
    cfg.model.in_chans = None
    cfg.data.path = str(tmp)
    return Trainer(cfg, tmp, DistInfo(0, 1, 0, device), ssl_setup(cfg), quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base", choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--only", choices=["2d", "3d"], help="run one of the two cases")
    ap.add_argument("--tmp", default="/tmp/foundation-bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # tiny baseline gradients must not hit slow denormal paths
    if args.only != "3d":
        print(json.dumps(run(args, dims=2, size=224, patch=16, chans=3)))
    if args.only != "2d":
        print(json.dumps(run(args, dims=3, size=96, patch=16, chans=1)))


if __name__ == "__main__":
    main()
