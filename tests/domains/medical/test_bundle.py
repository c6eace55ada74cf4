"""``foundation export-bundle``: the MONAI bundle's files and metadata, and MONAI's own tools running it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, oblique_affine, write_nifti
from test_segment import LABELS, make_checkpoint

from foundation.cli import main
from foundation.tasks.checkpoint import save_task_model

# MONAI's meta schema (metadata.json) and its tensor format specifiers; verify_metadata would download the schema
METADATA_FIELDS = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "optional_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_FIELDS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "models/model.pt",
    "docs/README.md",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    ckpt = make_checkpoint(root / "run")
    out = root / "organs"
    assert (
        main(
            [
                "export-bundle",
                "--task",
                "organ-segmentation",
                "--checkpoint",
                str(ckpt.parent),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_bundle_files_and_metadata(bundle):
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == sorted(FILES)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert [f for f in METADATA_FIELDS if f not in meta] == []
    assert meta["required_packages_version"]["foundation"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    for spec in (image, pred):
        assert [f for f in TENSOR_FIELDS if f not in spec] == []
    assert image["num_channels"] == 1 and image["spatial_shape"] == [16, 16, 16] and image["modality"] == "CT"
    assert pred["num_channels"] == 3 and pred["channel_def"] == {str(v): k for k, v in LABELS.items()}
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)  # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "backbone.pos_embed" in state
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    expected = (
        "bundle_root",
        "device",
        "dataset_dir",
        "dataset",
        "network_def",
        "inferer",
        "evaluator",
        "run",
    )
    assert [k for k in expected if k not in inference] == []
    assert "Apache License" in (bundle / "LICENSE").read_text()


def test_refuses_another_task_and_an_existing_bundle(tmp_path, bundle, capsys):
    other = tmp_path / "canopy.pt"
    save_task_model(
        other,
        task="canopy-height",
        task_meta={},
        backbone_args={},
        net=torch.nn.Linear(1, 1),
        config={},
        step=0,
    )
    assert main(["export-bundle", "--checkpoint", str(other), "--out", str(tmp_path / "b")]) == 2
    assert "is a 'canopy-height' model" in capsys.readouterr().err
    ckpt = str(bundle.parent / "run")
    assert (
        main(["export-bundle", "--task", "canopy-height", "--checkpoint", ckpt, "--out", str(tmp_path / "b")])
        == 2
    )
    assert "writes 'organ-segmentation' models only" in capsys.readouterr().err
    assert main(["export-bundle", "--checkpoint", ckpt, "--out", str(bundle)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _monai_bundle(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # 3 at once on few cores
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_monai_bundle_verify_run_and_train(tmp_path, bundle):
    """MONAI's CLI, from another working directory: verify_net_in_out passes, inference.json segments a folder
    (outputs on the inputs' shape and affine), train.json fine-tunes one epoch from model.pt."""
    ct = tmp_path / "ct"
    rng = np.random.default_rng(0)
    inputs = {
        "a": write_nifti(
            ct / "a.nii.gz", rng.integers(-900, 900, (20, 17, 9)).astype(np.int16), lps_affine()
        ),
        "b": write_nifti(
            ct / "b.nii.gz", rng.integers(-900, 900, (11, 14, 13)).astype(np.int16), oblique_affine()
        ),
    }
    data = tmp_path / "train"
    labels = np.zeros((18, 18, 8), np.uint8)
    labels[3:9, 3:9, 2:6], labels[10:16, 10:16, 3:7] = 1, 2
    write_nifti(data / "imagesTr" / "c.nii.gz", labels.astype(np.int16) * 300 - 100, lps_affine())
    write_nifti(data / "labelsTr" / "c.nii.gz", labels, lps_affine())
    configs = bundle / "configs"
    procs = {
        "verify": _monai_bundle(
            "verify_net_in_out",
            "--net_id",
            "network_def",
            "--meta_file",
            str(configs / "metadata.json"),
            "--config_file",
            str(configs / "inference.json"),
            "--device",
            "cpu",
            cwd=tmp_path,
        ),
        "infer": _monai_bundle(
            "run",
            "--config_file",
            str(configs / "inference.json"),
            "--dataset_dir",
            str(ct),
            "--output_dir",
            str(tmp_path / "seg"),
            "--num_workers",
            "0",
            cwd=tmp_path,
        ),
        "train": _monai_bundle(
            "run",
            "--config_file",
            str(configs / "train.json"),
            "--dataset_dir",
            str(data),
            "--epochs",
            "1",
            "--num_samples",
            "1",
            "--num_workers",
            "0",
            cwd=tmp_path,
        ),
    }
    outputs = {}
    for name, proc in procs.items():
        outputs[name], _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"monai.bundle {name} failed:\n{outputs[name][-3000:]}"
    assert "data shape of network is verified with no error" in outputs["verify"]
    for name, src in inputs.items():
        seg, image = nib.load(tmp_path / "seg" / f"{name}_seg.nii.gz"), nib.load(src)
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    tuned = torch.load(bundle / "models" / "model_finetuned.pt", weights_only=True)
    original = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in original)  # it trained
