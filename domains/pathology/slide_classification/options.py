"""``task.options`` of slide classification, checked once with every bad key or value named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError
from foundation.options import path_field
from foundation_domains.pathology.slide_classification.model import HEADS

BALANCE = ("weights", "sampling", "none")
TASK_NAME = "slide-classification"


@dataclass(frozen=True)
class SlideOptions:
    """Attributes:
    head: ``abmil`` (gated attention, Ilse et al. 2018) or ``mean`` (mean pooling, the baseline).
    hidden, attention_dim, dropout: the head's widths and dropout.
    instance_loss: add CLAM's instance loss with weight ``instance_weight`` on ``instance_k`` tiles per end.
    folds: patient-level k-fold cross-validation (ignored when the labels CSV has a ``split`` column).
    val_fraction: share of each label's non-test cases that validate a fold (early stopping); 0: none.
    balance: ``weights`` (class-weighted loss), ``sampling`` (labels drawn uniformly) or ``none``.
    max_tiles: a training bag larger than this is sampled to this many tiles per step (evaluation: whole).
    patience: validations without a better validation loss before a fold stops; training ends when every
        fold has stopped (0: never stop early; the best weights are still the ones kept).
    """

    head: str = "abmil"
    hidden: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    instance_loss: bool = False
    instance_weight: float = 0.3
    instance_k: int = 8
    folds: int = 5
    val_fraction: float = 0.2
    balance: str = "weights"
    max_tiles: int | None = 4096
    patience: int = 5

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Any = None) -> SlideOptions:
        """``task.options`` as written (typed once, when the config loads: ``cfg.task.typed_options``).

        Raises:
            ConfigError: naming ``task.options.KEY``.
        """
        reject_unknown_keys(options, cls, "task.options", TASK_NAME)
        opts = cls(**options)
        if opts.head not in HEADS:
            raise ConfigError(f"task.options.head={opts.head!r} is not one of {list(HEADS)}")
        if opts.balance not in BALANCE:
            raise ConfigError(f"task.options.balance={opts.balance!r} is not one of {list(BALANCE)}")
        for key in ("hidden", "attention_dim", "instance_k"):
            if getattr(opts, key) < 1:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r} must be >= 1")
        if opts.max_tiles is not None and opts.max_tiles < 1:
            raise ConfigError(f"task.options.max_tiles={opts.max_tiles!r} must be >= 1 (or null: whole bags)")
        for key in ("dropout", "instance_weight", "val_fraction"):
            if not 0 <= getattr(opts, key) < 1:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r} must be in [0, 1)")
        if opts.patience < 0:
            raise ConfigError(f"task.options.patience={opts.patience!r} must be >= 0")
        return opts


@dataclass(frozen=True)
class SlideInputs:
    """``task.inputs`` of slide classification (flags ``--features``, ``--labels``).

    Attributes:
        features: the ``--out`` folder of ``foundation embed`` (``*.h5``).
        labels: CSV ``slide_id,label[,case_id][,split]``.
    """

    features: str | None = path_field()
    labels: str | None = path_field()
