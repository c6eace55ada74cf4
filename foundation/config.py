"""Typed run configuration: dataclasses, strict YAML loading and dotlist overrides.

A recipe in ``foundation/recipes/`` (shipped with the package) is an instance of :class:`Config`. Loading is strict: unknown keys and values of
the wrong type are refused with the full key in the message. Nothing in a config is executed; OmegaConf
interpolation is switched off by resolving nothing and rejecting ``${...}`` strings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from foundation.errors import ConfigError
from foundation.options import parse_options, plain, resolve_paths
from foundation.options import reject_unknown_keys as reject_unknown_keys  # its home before options.py

_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _check_range(key: str, value: float, low: float, high: float, *, open_low=False, open_high=False) -> None:
    ok_low = value > low if open_low else value >= low
    ok_high = value < high if open_high else value <= high
    if not (ok_low and ok_high):
        lb, hb = "(" if open_low else "[", ")" if open_high else "]"
        raise ConfigError(f"{key}={value!r} must be in {lb}{low}, {high}{hb}")


@dataclass
class ModelConfig:
    """The ViT backbone. ``in_chans`` and ``spatial_dims`` default to what the domain says (null)."""

    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224
    in_chans: int | None = None
    spatial_dims: int | None = None
    reg_tokens: int = 0
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    # a recipe above, or timm:NAME (any timm VisionTransformer, its own defaults; patch_size, img_size,
    # reg_tokens, layerscale_init and qkv_bias then come from model_args or the architecture)
    model_args: dict[str, Any] = field(default_factory=dict)  # timm VisionTransformer kwargs, JSON values
    # starting weights: our run/export/checkpoint, a timm/Hugging Face folder, timm:NAME:FILE, a Meta DINOv2
    # .pth or a bare weights file of model.arch; RGB weights expand to N bands
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.arch.startswith("timm:"):
            _check_choice("model.arch", self.arch, _ARCHS)
        _check_range("model.patch_size", self.patch_size, 1, 1024)
        _check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, open_high=True)
        if self.spatial_dims is not None:
            _check_choice("model.spatial_dims", self.spatial_dims, (2, 3))
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.img_size={self.img_size} is not divisible by model.patch_size={self.patch_size}"
            )


@dataclass
class CropsConfig:
    """Multi-crop views (DINOv2) or the single view (MAE). Sizes are in pixels (voxels for 3D)."""

    global_size: int = 224
    local_size: int = 98
    n_global: int = 2
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])

    def __post_init__(self) -> None:
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"data.crops.{key}={[lo, hi]!r} must satisfy 0 < low <= high <= 1")
        if self.n_global != 2:
            raise ConfigError(f"data.crops.n_global={self.n_global!r}: DINOv2 uses exactly 2 global crops")
        if self.n_local < 0:
            raise ConfigError(f"data.crops.n_local={self.n_local!r} must be >= 0")


@dataclass
class DataConfig:
    path: str | None = None  # None: the domain's embedded sample
    num_workers: int = 2
    crops: CropsConfig = field(default_factory=CropsConfig)
    options: dict[str, Any] = field(default_factory=dict)  # domain-specific (e.g. mpp, bands), as written
    # Where photometric augmentation runs, for domains with device views (pathology): "workers", "device"
    # (batched on the training GPU; workers only read and crop) or "auto" (the device when CUDA is used).
    augment_on: str = "auto"

    # ``options`` typed by the domain's ``options_type`` when the config loads (never written to config.yaml)
    typed_options: Any = None

    def __post_init__(self) -> None:
        _check_choice("data.augment_on", self.augment_on, ("auto", "workers", "device"))


@dataclass
class SSLConfig:
    """The objective. DINOv2 fields first, then MAE fields; ``method`` picks one."""

    method: str = "dinov2"
    # DINOv2 (arXiv 2304.07193)
    head_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = True
    ibot_prototypes: int | None = None  # default: head_prototypes
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "softmax"  # or sinkhorn_knopp
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 37500
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    mask_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    # MAE (arXiv 2111.06377)
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        _check_choice("ssl.method", self.method, ("dinov2", "mae"))
        _check_choice("ssl.centering", self.centering, ("softmax", "sinkhorn_knopp"))
        _check_range("ssl.mask_ratio", self.mask_ratio, 0.0, 1.0, open_low=True, open_high=True)
        _check_range("ssl.mask_probability", self.mask_probability, 0.0, 1.0)
        _check_range("ssl.mask_ratio_min", self.mask_ratio_min, 0.0, 1.0, open_high=True)
        _check_range("ssl.mask_ratio_max", self.mask_ratio_max, self.mask_ratio_min, 1.0, open_high=True)
        _check_range("ssl.momentum_teacher", self.momentum_teacher, 0.0, 1.0)
        _check_range("ssl.momentum_teacher_end", self.momentum_teacher_end, 0.0, 1.0)
        if self.student_temp <= 0 or self.teacher_temp <= 0 or self.teacher_temp_warmup <= 0:
            raise ConfigError("ssl.student_temp, ssl.teacher_temp and ssl.teacher_temp_warmup must be > 0")


@dataclass
class OptimConfig:
    """AdamW with DINOv2's schedules. ``lr`` is the base lr at ``reference_batch_size``."""

    lr: float = 0.004
    lr_scaling: str = "sqrt"  # sqrt | linear | none: lr = base * scale(batch_size / reference_batch_size)
    reference_batch_size: int = 1024
    min_lr: float = 1e-6
    warmup_steps: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float | None = 3.0
    freeze_last_layer_steps: int = 1250

    def __post_init__(self) -> None:
        _check_choice("optim.lr_scaling", self.lr_scaling, ("sqrt", "linear", "none"))
        _check_range("optim.layer_decay", self.layer_decay, 0.0, 1.0, open_low=True)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be > 0")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas!r} must have two values")


@dataclass
class TrainConfig:
    steps: int = 125000
    batch_size: int = 64  # global, over all ranks and accumulation steps
    grad_accum_steps: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_nonfinite_in_a_row: int = 5
    compile: bool = False  # torch.compile each transformer block (student and teacher)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    parallel: str = "ddp"  # ddp: a full copy per rank; fsdp: FSDP2 shards per block, sharded DCP checkpoints
    checkpoint_async: bool = (
        True  # fsdp: checkpoints are written by a background thread while training goes on
    )
    eval_every: int = 0  # fine-tuning: validate every N steps (0: only at the end)
    collapse_patience: int = (
        20  # DINOv2: this many collapsed steps in a row are reported (log, metrics.jsonl)
    )
    stop_on_collapse: bool = False  # ... and end the run with an error

    def __post_init__(self) -> None:
        _check_choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        for key in (
            "steps",
            "batch_size",
            "grad_accum_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )


@dataclass
class TaskConfig:
    """Fine-tuning (``foundation finetune TASK``); pretraining ignores it.

    ``inputs`` are the task's data (images, labels, datalist, features...: the ``finetune`` flags fill them,
    as absolute paths), ``backbone`` / ``random_init`` where the backbone comes from, so the saved config alone
    re-runs a fine-tuning run. ``typed_options`` / ``typed_inputs`` are ``options`` / ``inputs`` typed by the
    task's dataclasses when the config loads for a task (not written to config.yaml).
    """

    freeze_backbone: bool = False  # train the head only
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. head type, loss, bins)
    inputs: dict[str, Any] = field(default_factory=dict)  # task-specific data paths (see the task's flags)
    backbone: str | None = None  # --backbone: run folder, export, checkpoint or published weights
    random_init: bool = False  # --random-init: an untrained backbone built from model.*
    typed_options: Any = None
    typed_inputs: Any = None


@dataclass
class KnnMonitorConfig:
    """Labelled folders (the domain's evaluation layout: one sub-folder per class) for the kNN monitor."""

    train: str | None = None
    val: str | None = None
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if (self.train is None) != (self.val is None):
            raise ConfigError(
                "eval.knn.train and eval.knn.val go together: give both labelled folders or neither"
            )
        if self.k < 1:
            raise ConfigError(f"eval.knn.k={self.k!r} must be >= 1")
        _check_range("eval.knn.temperature", self.temperature, 0.0, math.inf, open_low=True)


@dataclass
class EvalConfig:
    """Monitoring during pretraining, on the main rank; the training stream is untouched."""

    every: int = 0  # kNN (eval.knn) every N steps and after the last; 0: after the last step only
    knn: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)
    images: bool = True  # RUN/images/: the first batch's crops; with eval.knn, the PCA of patch tokens
    pca_inputs: int = 4  # kNN validation images in the PCA picture

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every!r} must be >= 0")
        if self.pca_inputs < 1:
            raise ConfigError(f"eval.pca_inputs={self.pca_inputs!r} must be >= 1")


@dataclass
class Config:
    seed: int = 0
    domain: str = "images"
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    _name: str = MISSING  # filled by load_config with the recipe's file name (or "default")


def _reject_interpolation(node: Any, key: str = "") -> None:
    """Configs are data: refuse ``${...}`` so nothing is resolved or executed."""
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_interpolation(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_interpolation(v, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"{key}={node!r}: interpolation is not allowed in recipes")


def _parse_dotlist(overrides: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=50)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({first})") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped in the package (wheel and editable installs)


def list_recipes() -> list[str]:
    """Names of the shipped recipes, ``domain/name``."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.glob("*/*.yaml"))


def recipe_path(value: str | Path) -> Path:
    """A recipe given as a YAML file, or by the name of a shipped one: ``images/tiny`` or ``images/tiny.yaml``
    (``configs/images/tiny.yaml``, the path in a checkout before recipes became package data, also works).

    Raises:
        ConfigError: neither a file nor a shipped recipe; the message lists the shipped ones.
    """
    path = Path(value)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/")
    shipped = RECIPES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config {str(value)!r} is neither a file nor a shipped recipe (one of: {', '.join(list_recipes())})"
    )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    pretraining: bool = True,
    task: Any = None,
    values: dict[str, Any] | None = None,
    **defaults: Any,
) -> Config:
    """Build a :class:`Config` from a YAML recipe plus ``key=value`` overrides.

    Args:
        path: YAML recipe, a file or a shipped recipe's name (``images/tiny``); ``None`` uses the dataclass
            defaults.
        overrides: dotlist such as ``["train.steps=50", "train.batch_size=32"]``.
        pretraining: check the SSL crop sizes against the patch size (fine-tuning recipes have no crops).
        task: the task (``options_type``, ``inputs_type``) whose ``task.options`` / ``task.inputs`` are typed;
            ``None`` leaves them as written.
        values: a nested dict applied last (command-line flags: ``{"task": {"inputs": {"images": ...}}}``).
        defaults: top-level values applied before the recipe (e.g. ``domain="pathology"``).

    Raises:
        ConfigError: unknown key, wrong type, or a value out of range; the message names the key.
    """
    layers: list[dict[str, Any]] = [defaults] if defaults else []
    name = "default"
    if path is not None:
        path = recipe_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        layers.append(data)
        name = path.stem
    if overrides:
        layers.append(_parse_dotlist(overrides))
    if values:
        layers.append(values)
    for layer in layers:
        _reject_interpolation(layer)
        _reject_derived(layer)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers, {"_name": name})
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from e
    if pretraining:
        _cross_checks(cfg)
    elif not math.isfinite(cfg.optim.lr):
        raise ConfigError("optim.lr must be finite")
    _type_options(cfg, task)
    return cfg


_DERIVED = {"data": ("typed_options",), "task": ("typed_options", "typed_inputs")}


def _reject_derived(layer: dict[str, Any]) -> None:
    for section, keys in _DERIVED.items():
        node = layer.get(section)
        for key in keys:
            if isinstance(node, dict) and key in node:
                raise ConfigError(f"{section}.{key} is filled when the config loads; set {section}.options")


def _type_options(cfg: Config, task: Any) -> None:
    """Type ``data.options`` by the domain's dataclass and, for a task, ``task.options`` / ``task.inputs`` by
    the task's; the inputs are written back resolved (absolute paths), so config.yaml re-runs from anywhere."""
    from foundation.domain import domain_options_type  # the domain registry imports this module

    options_type = domain_options_type(cfg.domain)
    if options_type is None:  # an unknown domain (refused where it is used) or a plug-in without options
        cfg.data.typed_options = dict(cfg.data.options)
    else:
        cfg.data.typed_options = parse_options(
            options_type, cfg.data.options, "data.options", f"the {cfg.domain} domain", cfg
        )
    if task is None:
        return
    options_type, inputs_type = getattr(task, "options_type", None), getattr(task, "inputs_type", None)
    cfg.task.typed_options = (  # a plug-in task without the dataclasses keeps untyped dicts
        parse_options(options_type, cfg.task.options, "task.options", task.name, cfg)
        if options_type is not None
        else dict(cfg.task.options)
    )
    if inputs_type is None:
        cfg.task.typed_inputs = dict(cfg.task.inputs)
    else:
        inputs = resolve_paths(parse_options(inputs_type, cfg.task.inputs, "task.inputs", task.name, cfg))
        cfg.task.typed_inputs = inputs
        cfg.task.inputs = plain(inputs)
    if cfg.task.backbone:
        cfg.task.backbone = _absolute(cfg.task.backbone)


def _absolute(source: str) -> str:
    """A backbone source as an absolute path; ``timm:NAME:FILE`` and URLs keep their form."""
    if source.startswith("timm:"):
        name, _, file = source[len("timm:") :].partition(":")
        return f"timm:{name}:{_absolute(file)}" if file else source
    if "://" in source:
        return source
    return str(Path(source).expanduser().absolute())


def _cross_checks(cfg: Config) -> None:
    crops = cfg.data.crops
    keys = ("global_size", "local_size") if cfg.ssl.method == "dinov2" and crops.n_local else ("global_size",)
    for key in keys:
        size = getattr(crops, key)
        if size % cfg.model.patch_size:
            raise ConfigError(
                f"data.crops.{key}={size} is not divisible by model.patch_size={cfg.model.patch_size}; "
                "choose a multiple of the patch size"
            )
    if not math.isfinite(cfg.optim.lr):
        raise ConfigError("optim.lr must be finite")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as YAML data: options as written, without the typed values derived from them."""
    out = dataclasses.asdict(cfg)
    for section, keys in _DERIVED.items():
        for key in keys:
            out[section].pop(key, None)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config next to the run (dinov2's ``write_config``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
