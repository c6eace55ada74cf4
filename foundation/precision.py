"""One rule for "auto" mixed precision, used by training, evaluation and every inference command: bf16 on CUDA
(tensor cores, no loss scaling needed), fp32 elsewhere (CPU autocast in bf16 is slower than fp32 on most CPUs)."""

from __future__ import annotations

import torch

from foundation.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str, *, flag: str = "--precision") -> str:
    """``precision`` made concrete for ``device``: ``auto`` is ``bf16`` on CUDA, ``fp32`` elsewhere.

    Raises:
        ConfigError: not one of :data:`PRECISIONS` (naming ``flag``).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast_dtype(
    precision: str, device: torch.device | str, *, flag: str = "--precision"
) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None means full precision (no autocast)."""
    return _DTYPES[resolve_precision(precision, device, flag=flag)]
