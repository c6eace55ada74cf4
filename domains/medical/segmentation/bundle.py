"""``foundation export-bundle``: an organ-segmentation model as a MONAI bundle (https://docs.monai.io/en/latest/mb_specification.html).

The bundle holds ``LICENSE``, ``configs/metadata.json`` (every field of MONAI's meta schema),
``configs/inference.json`` (``python -m monai.bundle run``: the task's preprocessing, Gaussian sliding window,
argmax, ``Invertd`` with nearest-neighbour interpolation back to the input grid, ``SaveImaged``),
``configs/train.json`` (fine-tuning with DiceCE from ``models/model.pt``), ``models/model.pt`` (a plain state
dict, ``torch.load(..., weights_only=True)``) and ``docs/README.md``. ``network_def`` instantiates our own
network class, so the bundle needs this package installed (``required_packages_version`` says so).

The bundle is assembled in a temporary folder, checked (the network the configs describe loads ``model.pt``
strictly) and then renamed into place, so ``--out`` is never a half-written bundle. It carries the marker of our
outputs (``.foundation.json``), and ``--overwrite`` replaces only such a bundle, file by file, never a folder
of anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.errors import CheckpointError, ConfigError, DataError
from foundation.outputs import building_dir, check_output_dir, check_writable
from foundation_domains.medical.segmentation.bundle_configs import (
    TASK,
    bundle_metadata,
    inference_config,
    network_def,
    readme,
    train_config,
)
from foundation_domains.medical.segmentation.segment import checkpoint_paths

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
BUNDLE_KIND = "monai-bundle"  # the kind in the bundle's .foundation.json (foundation.outputs)

LICENSE_TEXT = """\
Copyright {copyright}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle except
in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is distributed
on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
the specific language governing permissions and limitations under the License.

The model weights were trained on data chosen by whoever fine-tuned them; the terms of that data may restrict how
the weights can be used. This model is for research; it is not a medical device.
"""


# -- the CLI -----------------------------------------------------------------------------------------------------
def add_export_bundle_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-bundle",
        help="write a fine-tuned organ-segmentation model as a MONAI bundle (monai.bundle run / verify_*)",
        description="Writes LICENSE, configs/metadata.json, configs/inference.json, configs/train.json, "
        "models/model.pt (plain state dict) and docs/README.md. The bundle's network_def uses this package, "
        "so it must be installed where the bundle runs.",
        epilog="example:\n  foundation export-bundle --task organ-segmentation --checkpoint runs/organs --out bundles/organs\n"
        "  python -m monai.bundle run --config_file bundles/organs/configs/inference.json "
        "--dataset_dir ct/ --output_dir seg/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="fine-tuned model: run folder, model.pt or training checkpoint"
    )
    p.add_argument("--out", required=True, help="bundle folder to create (its parent must exist)")
    p.add_argument("--task", help=f"the checkpoint's task (default: read from it); only {TASK!r} is exported")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a bundle written by export-bundle before (never any other folder)",
    )
    p.add_argument("--version", default="0.1.0", help="bundle version (metadata.json)")
    p.add_argument("--authors", default="foundation export-bundle", help="metadata.json authors")
    p.add_argument(
        "--copyright", default="the authors of the fine-tuned model", help="metadata.json copyright"
    )
    p.add_argument("--license", help="text file to use as the bundle's LICENSE (default: Apache-2.0 notice)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(func=cmd_export_bundle)


def cmd_export_bundle(args: argparse.Namespace) -> int:
    out = export_bundle(
        args.checkpoint,
        Path(args.out),
        task=args.task,
        overwrite=args.overwrite,
        version=args.version,
        authors=args.authors,
        copyright=args.copyright,
        license_file=Path(args.license) if args.license else None,
    )
    log.info("MONAI bundle written to %s", out)
    print(json.dumps({"bundle": str(out), "inference": str(out / "configs" / "inference.json")}))
    return 0


# -- writing the bundle ------------------------------------------------------------------------------------------
def export_bundle(
    checkpoint: str | Path,
    out: Path,
    *,
    task: str | None = None,
    overwrite: bool = False,
    version: str = "0.1.0",
    authors: str = "foundation export-bundle",
    copyright: str = "the authors of the fine-tuned model",
    license_file: Path | None = None,
) -> Path:
    """Write the bundle folder ``out`` from a fine-tuned organ-segmentation checkpoint.

    ``out`` is checked before anything is read: it must be new, empty, or a bundle written here before
    (replaced only with ``overwrite``, and only when it holds nothing but its own files); never the
    checkpoint, nor a folder holding it. The bundle is built in a temporary folder next to ``out`` and moved
    into place once its network loads its weights.

    Raises:
        ConfigError: ``task`` is not an exportable task.
        OutputError: ``out`` may not be written (see :func:`foundation.outputs.check_output_dir`), or the disk
            is full or read-only.
        CheckpointError: unreadable checkpoint, another task than ``task``, or weights that do not fit.
        DataError: the ``license_file`` is missing.
    """
    from foundation_domains.medical.segmentation.model import load_segmentation

    if task is not None and task != TASK:
        raise ConfigError(f"--task {task!r}: export-bundle writes {TASK!r} models only")
    out = Path(out)
    inputs = checkpoint_paths(checkpoint) + ([license_file] if license_file is not None else [])
    check_output_dir(out, BUNDLE_KIND, overwrite=overwrite, inputs=inputs)
    check_writable(out.parent, "--out")
    if license_file is not None and not license_file.is_file():
        raise DataError(f"--license {str(license_file)!r} is not a file")
    model = load_segmentation(checkpoint)  # another task's model is refused naming both
    net, meta, backbone_args = model.net, model.meta, model.backbone_args
    license_text = license_file.read_text() if license_file else LICENSE_TEXT.format(copyright=copyright)
    source = f"{model.source} (step {model.step})"
    net_def = network_def(backbone_args, meta.head)
    texts = {
        "configs/metadata.json": _json(bundle_metadata(meta, version, authors, copyright, source)),
        "configs/inference.json": _json(inference_config(meta, net_def)),
        "configs/train.json": _json(train_config(meta, net_def)),
        "LICENSE": license_text,
        "docs/README.md": readme(meta, backbone_args, source, version),
    }
    with building_dir(out, BUNDLE_KIND, overwrite=overwrite) as tmp:
        _write_bundle(tmp, net, texts)
        check_bundle(tmp)
    return out


def _json(content: dict) -> str:
    return json.dumps(content, indent=4) + "\n"


def _write_bundle(root: Path, net: torch.nn.Module, texts: dict[str, str]) -> None:
    """``models/model.pt`` (a plain state dict) and the text files ``texts`` (relative path: content)."""
    import torch

    (root / "models").mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, root / "models" / "model.pt")
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def check_bundle(root: Path) -> None:
    """Build ``network_def`` from ``inference.json`` as MONAI does and load ``model.pt`` into it strictly.

    Raises:
        CheckpointError: the configs and the weights disagree (the state-dict mismatch users meet at run time).
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    try:
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    except Exception as e:
        raise CheckpointError(f"the bundle's network_def does not load its own models/model.pt: {e}") from e


# -- used by the bundle configs at run time ----------------------------------------------------------------------
def volume_list(dataset_dir: str | os.PathLike) -> list[str]:
    """NIfTI files under ``dataset_dir`` (recursively, sorted), hidden files excluded.

    Raises:
        DataError: the folder is missing or holds no NIfTI file.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"--dataset_dir {str(root)!r} is not a folder")
    files = sorted(
        str(p)
        for p in root.rglob("*")
        if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
    )
    if not files:
        raise DataError(f"--dataset_dir {str(root)!r} holds no NIfTI files (.nii, .nii.gz)")
    return files


def training_pairs(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image", "label"}]`` from a Decathlon ``dataset.json`` or from ``imagesTr``/``labelsTr`` by file name.

    Raises:
        DataError: no pairs, or an image without its label map.
    """
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        try:
            entries = json.loads((root / "dataset.json").read_text())["training"]
            pairs = [{"image": str(root / e["image"]), "label": str(root / e["label"])} for e in entries]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root / 'dataset.json'}: no 'training' list of image/label pairs ({e})") from e
    else:
        images = volume_list(root / "imagesTr") if (root / "imagesTr").is_dir() else []
        pairs = [{"image": p, "label": str(root / "labelsTr" / Path(p).name)} for p in images]
    missing = [p["label"] for p in pairs if not Path(p["image"]).is_file() or not Path(p["label"]).is_file()]
    if missing or not pairs:
        raise DataError(
            f"--dataset_dir {str(root)!r}: expected dataset.json or imagesTr/ + labelsTr/ with matching names; "
            f"missing: {missing[:3] or 'everything'}"
        )
    return pairs
