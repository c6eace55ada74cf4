"""The files of an organ-segmentation MONAI bundle, as data: ``metadata.json`` (MONAI's meta schema),
``inference.json`` and ``train.json`` (``python -m monai.bundle run`` configs built from the task's own
preprocessing spec) and ``docs/README.md``. :mod:`foundation_domains.medical.segmentation.bundle` writes them.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from foundation_domains.medical.segmentation.meta import SegmentationMeta

TASK = "organ-segmentation"
SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
# The same schema shipped with this package, so `monai.bundle verify_metadata --filepath META_SCHEMA` needs no
# network (MONAI downloads SCHEMA only when the file at --filepath does not exist).
META_SCHEMA = Path(__file__).with_name("schema") / SCHEMA.rsplit("/", 1)[-1]
# Where the bundle configs find their run-time helpers (volume_list, training_pairs).
_THIS = "foundation_domains.medical.segmentation.bundle"
# The folder above the --config_file given to `python -m monai.bundle run`, else the working directory, so the
# bundle runs from anywhere (override with --bundle_root).
BUNDLE_ROOT = (
    "$os.path.dirname(os.path.dirname(os.path.abspath(next((a.split('=', 1)[1] if '=' in a else sys.argv[i + 1] "
    "for i, a in enumerate(sys.argv) if a.startswith('--config_file') and (i + 1 < len(sys.argv) or '=' in a)), "
    "'configs/inference.json'))))"
)
REFERENCES = [
    "Hatamizadeh A. et al. UNETR: Transformers for 3D Medical Image Segmentation. WACV 2022. arXiv:2103.10504",
    "He K. et al. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022. arXiv:2111.06377",
]


# -- the three JSON files ----------------------------------------------------------------------------------------
def network_def(backbone_args: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """Our network as a bundle config component: ``build_segmentation_net(build_vit(**backbone_args), head)``."""
    return {
        "_target_": "foundation_domains.medical.segmentation.model.build_segmentation_net",
        "backbone": {"_target_": "foundation.models.vit.build_vit", **backbone_args},
        "head": dict(head),
    }


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "foundation",
        "monai",
        "torch",
        "numpy",
        "nibabel",
        "pytorch-ignite",
        "timm",
        "fire",
        "pyyaml",
    ):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _channel_defs(meta: SegmentationMeta) -> tuple[dict[str, str], dict[str, str]]:
    labels = meta.class_names()
    classes = {str(i): labels.get(i, f"class_{i}") for i in range(meta.num_classes)}
    in_chans = meta.in_chans
    image = {str(c): "image" if in_chans == 1 else f"channel {c}" for c in range(in_chans)}
    return image, classes


def bundle_metadata(
    meta: SegmentationMeta, version: str, authors: str, copyright: str, source: str
) -> dict[str, Any]:
    """``metadata.json`` with every field of MONAI's meta schema; inputs and outputs are ROI-sized patches."""
    v = _versions()
    image_def, classes = _channel_defs(meta)
    roi = list(meta.roi_size)
    modality = meta.modality.upper()
    organs = ", ".join(name for i, name in classes.items() if i != "0")
    spacing = list(meta.spacing) if meta.spacing is not None else None
    packages = {
        k: v[k] for k in ("foundation", "nibabel", "pytorch-ignite", "timm", "fire", "pyyaml") if k in v
    }
    preset = (
        f"HU window {meta.window[0]:g}..{meta.window[1]:g} scaled to [0, 1]"
        if modality == "CT"
        else "0.5/99.5 percentiles per channel scaled to [0, 1]"
    )
    return {
        "schema": SCHEMA,
        "version": version,
        "changelog": {version: f"exported by foundation export-bundle from {source}"},
        "monai_version": v.get("monai", ""),
        "pytorch_version": v.get("torch", "").split("+")[0],
        "numpy_version": v.get("numpy", ""),
        # no "optional_packages_version": MONAI >= 1.4 renames it to required_packages_version when it reads
        # the file, and an empty one would then replace the list below
        "required_packages_version": packages,
        "name": f"foundation {modality} organ segmentation",
        "task": f"Segmentation of {organs} in {modality} volumes",
        "description": (
            "A ViT backbone pretrained with foundation (MAE 3D) under a UNETR-style decoder, fine-tuned with "
            f"`foundation finetune organ-segmentation`. Inputs are reoriented to RAS, resampled to {spacing or 'native'} "
            f"mm and intensity-normalised ({preset}); predictions are written on the input grid. Needs the "
            "`foundation` package installed (network_def)."
        ),
        "authors": authors,
        "copyright": f"Copyright {copyright}",
        "data_source": "the labelled volumes the checkpoint was fine-tuned on (see changelog)",
        "data_type": "nibabel",
        "image_classes": f"{len(image_def)} channel(s), {preset}",
        "label_classes": "single channel label map: " + ", ".join(f"{i} is {n}" for i, n in classes.items()),
        "pred_classes": f"{len(classes)} channels of logits; the label is the index of the largest",
        "eval_metrics": {},  # the model file records none
        "intended_use": "Research only; not for clinical or diagnostic use.",
        "references": REFERENCES,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality == "CT" else "magnitude",
                    "modality": modality,
                    "num_channels": meta.in_chans,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": image_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "modality": modality,
                    "num_channels": meta.num_classes,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": classes,
                }
            },
        },
    }


def _common(meta: SegmentationMeta, net_def: dict[str, Any]) -> dict[str, Any]:
    return {
        "imports": [
            "$import glob",
            "$import os",
            "$import sys",
            "$import numpy",
            f"$import {_THIS} as foundation_bundle",
        ],
        "bundle_root": BUNDLE_ROOT,
        "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": net_def,
        "network": "$@network_def.to(@device)",
        "num_workers": 2,
    }


def inference_config(meta: SegmentationMeta, net_def: dict[str, Any]) -> dict[str, Any]:
    """``inference.json``: every NIfTI file under ``dataset_dir`` to ``output_dir/<name>_seg.nii.gz``."""
    from foundation_domains.medical.segmentation.transforms import preprocessing_config

    return {
        **_common(meta, net_def),
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$foundation_bundle.volume_list(@dataset_dir)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_config(meta, ("image",))},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': p} for p in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(meta.roi_size),
            "sw_batch_size": meta.sw_batch_size or 4,
            "overlap": float(meta.overlap),
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_ext": ".nii.gz",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "$torch.cuda.is_available()",
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"],
    }


def train_config(meta: SegmentationMeta, net_def: dict[str, Any]) -> dict[str, Any]:
    """``train.json``: fine-tune ``models/model.pt`` further on ``dataset_dir`` (Decathlon ``dataset.json`` or
    ``imagesTr``/``labelsTr``), DiceCE on positive/negative ROI crops; writes ``models/model_finetuned.pt``."""
    from foundation_domains.medical.segmentation.transforms import preprocessing_config

    roi = list(meta.roi_size)
    keys = ["image", "label"]
    augment = [
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": roi},
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": keys,
            "label_key": "label",
            "spatial_size": roi,
            "pos": 1,
            "neg": 1,
            "num_samples": "@num_samples",
            "image_key": "image",
            "image_threshold": 0,
        },
        *({"_target_": "RandFlipd", "keys": keys, "prob": 0.1, "spatial_axis": a} for a in range(3)),
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
    ]
    return {
        **_common(meta, net_def),
        "output_dir": "$os.path.join(@bundle_root, 'models')",
        "epochs": 10,
        "learning_rate": 1e-4,
        "num_samples": 2,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
            "weight_decay": 1e-5,
        },
        "train": {
            "datalist": "$foundation_bundle.training_pairs(@dataset_dir)",
            "preprocessing": {
                "_target_": "Compose",
                "transforms": preprocessing_config(meta, ("image",), label_key="label") + augment,
            },
            "dataset": {
                "_target_": "Dataset",
                "data": "@train#datalist",
                "transform": "@train#preprocessing",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": 1,
                "shuffle": True,
                "num_workers": "@num_workers",
            },
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "load_path": "@ckpt_path",
                    "load_dict": {"model": "@network"},
                    "map_location": "@device",
                },
                {
                    "_target_": "CheckpointSaver",
                    "save_dir": "@output_dir",
                    "save_dict": {"model": "@network"},
                    "save_final": True,
                    "final_filename": "model_finetuned.pt",
                },
                {
                    "_target_": "StatsHandler",
                    "tag_name": "train_loss",
                    "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                },
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": "@epochs",
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "inferer": "@train#inferer",
                "train_handlers": "@train#handlers",
                "amp": "$torch.cuda.is_available()",
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"],
    }


def readme(meta: SegmentationMeta, backbone_args: dict[str, Any], source: str, version: str) -> str:
    _, classes = _channel_defs(meta)
    in_chans, roi = meta.in_chans, ", ".join(str(r) for r in meta.roi_size)
    labels = "\n".join(f"| {i} | {name} |" for i, name in classes.items())
    return f"""# Organ segmentation bundle (foundation)

Version {version}, exported by `foundation export-bundle` from `{source}`.
A `{backbone_args.get("arch", "ViT")}` 3D backbone (patch {backbone_args.get("patch_size")}) under a UNETR-style
decoder. Research use only; not a medical device.

## Requirements
`network_def` instantiates `foundation_domains.medical.segmentation.model.build_segmentation_net`, so the `foundation`
package (with its `medical` extra: MONAI, nibabel, pytorch-ignite, fire) must be installed where the bundle runs.

## Inference
```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir CT_FOLDER --output_dir SEG_FOLDER
```
Every `.nii`/`.nii.gz` under `CT_FOLDER` gives `SEG_FOLDER/<name>_seg.nii.gz`: preprocessing (RAS, spacing
{list(meta.spacing) if meta.spacing is not None else None} mm, {meta.modality.upper()} intensity preset), sliding window (ROI
{list(meta.roi_size)}, overlap {meta.overlap}, Gaussian), argmax, then `Invertd` with nearest-neighbour
interpolation: the label map has the input's shape and affine. `bundle_root` defaults to the folder above the
`--config_file` given; override `--bundle_root`, `--ckpt_path`, `--device`, `--num_workers` as needed.

## Fine-tuning
```bash
python -m monai.bundle run --config_file configs/train.json --dataset_dir DATA --epochs 50
```
`DATA` holds a Decathlon `dataset.json` or `imagesTr/` + `labelsTr/` with matching names. Training starts from
`models/model.pt` and writes `models/model_finetuned.pt`; run inference with it by passing
`--ckpt_path models/model_finetuned.pt`.

## TorchScript
`torch.jit.script` does not compile the backbone (its shape checks), but tracing at the ROI size works, and the
sliding window only ever feeds ROI-sized windows:
```bash
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
    --input_shape "[1, {in_chans}, {roi}]"
```

## Labels
| value | structure |
|---|---|
{labels}

## Checks
`python -m monai.bundle verify_net_in_out --net_id network_def --meta_file configs/metadata.json --config_file configs/inference.json`
checks the ROI-sized input and the {len(classes)}-channel output.
`python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath SCHEMA` checks the metadata
offline against the schema shipped with `foundation` (SCHEMA: the path printed by
`python -c "from foundation_domains.medical.segmentation.bundle_configs import META_SCHEMA; print(META_SCHEMA)"`).
"""
