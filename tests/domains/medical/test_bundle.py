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
from foundation.outputs import MARKER
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.medical.segmentation.bundle_configs import META_SCHEMA

# MONAI's meta schema (metadata.json) and its tensor format specifiers; verify_metadata would download the schema
METADATA_FIELDS = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
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
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == sorted(
        (*FILES, MARKER)
    )
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert [f for f in METADATA_FIELDS if f not in meta] == []
    assert "optional_packages_version" not in meta  # MONAI >= 1.4 would let an empty one replace the list
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
    assert main(["export-bundle", "--checkpoint", str(other), "--out", str(tmp_path / "b")]) == 1
    assert "is a 'canopy-height' model" in capsys.readouterr().err
    ckpt = str(bundle.parent / "run")
    assert (
        main(["export-bundle", "--task", "canopy-height", "--checkpoint", ckpt, "--out", str(tmp_path / "b")])
        == 1
    )
    assert "writes 'organ-segmentation' models only" in capsys.readouterr().err
    assert main(["export-bundle", "--checkpoint", ckpt, "--out", str(bundle)]) == 1
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


# -- metadata as MONAI reads it ----------------------------------------------------------------------------------
def test_package_versions_survive_monai_reading_the_metadata(bundle, tmp_path):
    """MONAI >= 1.4 renames optional_packages_version to required_packages_version as it reads a bundle's
    metadata: an empty optional one would wipe the list. Ours has none, so the versions are all still there."""
    import monai
    from monai.bundle import ConfigParser

    path = bundle / "configs" / "metadata.json"
    written = json.loads(path.read_text())
    parser = ConfigParser()
    parser.read_meta(str(path))
    meta = parser.get("_meta_")
    assert meta["required_packages_version"] == written["required_packages_version"]
    assert {"foundation", "timm", "nibabel"} <= set(meta["required_packages_version"])
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == np.__version__

    wiped = tmp_path / "metadata.json"  # what the old metadata.json did to the list
    wiped.write_text(json.dumps({**written, "optional_packages_version": {}}))
    old = ConfigParser()
    old.read_meta(str(wiped))
    assert old.get("_meta_")["required_packages_version"] == {}


def test_verify_metadata_runs_offline_against_the_shipped_schema(bundle, tmp_path):
    from monai.bundle import verify_metadata

    schema = META_SCHEMA.read_bytes()
    meta_file = bundle / "configs" / "metadata.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file)]
    done = subprocess.run([*cmd, "--filepath", str(META_SCHEMA)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "metadata is verified with no error" in done.stdout + done.stderr
    assert META_SCHEMA.read_bytes() == schema  # read, never downloaded over

    incomplete = tmp_path / "metadata.json"  # the schema is not a formality: a missing field fails
    meta = json.loads(meta_file.read_text())
    del meta["network_data_format"]["outputs"]["pred"]["spatial_shape"]
    incomplete.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="spatial_shape"):
        verify_metadata(meta_file=str(incomplete), filepath=str(META_SCHEMA))


# -- what export-bundle may write over ---------------------------------------------------------------------------
def export(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["export-bundle", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_overwrite_replaces_only_a_bundle_of_ours_holding_only_its_files(bundle, tmp_path, capsys):
    ckpt = bundle.parent / "run"
    theirs = tmp_path / "theirs"
    (theirs / "configs").mkdir(parents=True)
    (theirs / "configs" / "metadata.json").write_text("{}")
    (theirs / "notes.txt").write_text("my notes")
    before = snapshot(theirs)
    assert export(ckpt, theirs, "--overwrite") == 1
    assert "a folder of other files" in error_line(capsys) and snapshot(theirs) == before

    ours = tmp_path / "ours"
    assert export(ckpt, ours) == 0
    (ours / "docs" / "my_results.csv").write_text("dice\n0.9\n")
    before = snapshot(ours)
    assert export(ckpt, ours, "--overwrite") == 1
    assert "holds files that are not ours (docs/my_results.csv)" in error_line(capsys)
    assert snapshot(ours) == before

    (ours / "docs" / "my_results.csv").unlink()
    (ours / "models" / "model.pt").write_bytes(b"stale")
    assert export(ckpt, ours, "--overwrite") == 0
    state = torch.load(ours / "models" / "model.pt", weights_only=True)  # the stale file was replaced
    assert state.keys() == torch.load(bundle / "models" / "model.pt", weights_only=True).keys()
    assert leftovers(tmp_path) == []


def test_out_that_is_or_holds_the_checkpoint_or_a_file_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = make_checkpoint(run)
    before = snapshot(tmp_path)
    for out in (run, ckpt, tmp_path):
        assert export(run, out, "--overwrite") == 1
        assert "is (or holds) the input" in error_line(capsys)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert export(ckpt, notes, "--overwrite") == 1
    assert "exists and is not a folder" in error_line(capsys)
    assert snapshot(tmp_path) == {**before, "notes.txt": b"mine"}


def test_bad_checkpoint_leaves_no_folder_behind(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export(bad, tmp_path / "bundle") == 1
    assert "model.pt" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_full_or_read_only_disk_is_one_clear_error(bundle, small_disk, capsys):
    ckpt = bundle.parent / "run"
    full = small_disk(512)  # far less than the weights
    assert export(ckpt, full / "bundle") == 1
    line = error_line(capsys)
    assert str(full / "bundle") in line and "no space left on device" in line
    assert list(full.iterdir()) == []

    read_only = small_disk(4096)
    if subprocess.run(["mount", "-o", "remount,ro", str(read_only)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount a tmpfs read-only here")
    assert export(ckpt, read_only / "bundle") == 1
    assert "read-only file system" in error_line(capsys)
