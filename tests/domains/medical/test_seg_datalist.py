"""Segmentation data: one preprocessing spec in two forms (Compose and bundle config), datalist checks, crops."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, write_nifti
from monai.bundle import ConfigParser

from foundation.errors import ConfigError, DataError
from foundation_domains.medical.segmentation.data import SegmentationCropDataset, prepare_volume
from foundation_domains.medical.segmentation.datalist import hold_out, load_datalist
from foundation_domains.medical.segmentation.meta import SegmentationMeta
from foundation_domains.medical.segmentation.transforms import preprocessing, preprocessing_config


def _ct_pair(tmp_path: Path, shape=(20, 24, 12), affine=None, name="case") -> dict[str, str]:
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, shape).astype(np.int16)
    labels = (hu > 150).astype(np.uint8) + (hu > 400).astype(np.uint8)
    affine = lps_affine((1.3, 0.9, 2.7)) if affine is None else affine
    image = write_nifti(tmp_path / "images" / f"{name}.nii.gz", hu, affine)
    label = write_nifti(tmp_path / "labels" / f"{name}.nii.gz", labels, affine)
    return {"image": str(image), "label": str(label)}


def seg_meta(**kw) -> SegmentationMeta:
    """A model's metadata; the preprocessing reads spacing, modality and window."""
    kw = {"head": {}, "in_chans": 1, "roi_size": (16, 16, 16), "num_classes": 3, **kw}
    return SegmentationMeta(window=(-175.0, 250.0), **kw)


CT_META = seg_meta(spacing=(2.0, 1.5, 3.0), modality="ct")
MR_META = seg_meta(spacing=None, modality="mr")


@pytest.mark.parametrize("meta", [CT_META, MR_META])
def test_compose_and_bundle_config_give_identical_arrays(tmp_path, meta):
    pair = _ct_pair(tmp_path)
    direct = preprocessing(meta, label_key="label")(dict(pair))
    config = preprocessing_config(meta, label_key="label")
    json.dumps(config)  # goes into a bundle's inference.json as is
    parser = ConfigParser({"pre": {"_target_": "Compose", "transforms": config}})
    bundled = parser.get_parsed_content("pre")(dict(pair))
    for key in ("image", "label"):
        assert torch.equal(direct[key], bundled[key]), key
        assert np.allclose(direct[key].affine, bundled[key].affine)
    assert direct["image"].shape == direct["label"].shape
    assert set(np.unique(direct["label"].numpy())) <= {0.0, 1.0, 2.0}  # nearest for labels
    assert float(direct["image"].min()) >= 0.0 and float(direct["image"].max()) <= 1.0


def test_lps_volume_is_reoriented_to_ras_and_windowed(tmp_path):
    pair = _ct_pair(tmp_path)
    out = preprocessing(replace(CT_META, spacing=None), label_key="label")(dict(pair))
    hu = nib.load(pair["image"]).get_fdata()
    expected = (np.clip(hu[::-1, ::-1, :], -175, 250) + 175) / 425  # LPS -> RAS flips i and j
    assert np.allclose(out["image"][0].numpy(), expected, atol=1e-6)
    affine = out["image"].affine.numpy()
    assert (np.diag(affine)[:3] > 0).all()  # RAS+: every voxel axis runs along +R, +A, +S


def test_resampling_reaches_the_target_spacing(tmp_path):
    out = preprocessing(CT_META, label_key="label")(_ct_pair(tmp_path))
    spacing = np.linalg.norm(out["image"].affine.numpy()[:3, :3], axis=0)
    assert np.allclose(spacing, CT_META.spacing)
    assert tuple(out["image"].shape[1:]) == (
        13,
        15,
        11,
    )  # field of view kept (MONAI rounds the voxel count up)


def test_mr_scales_each_channel_by_its_percentiles(tmp_path):
    rng = np.random.default_rng(1)
    data = np.stack([rng.normal(100, 10, (8, 8, 8)), rng.normal(5000, 900, (8, 8, 8))], -1).astype(np.float32)
    path = write_nifti(tmp_path / "mr.nii.gz", data, np.eye(4))
    out = preprocessing(MR_META)({"image": str(path)})["image"]
    assert out.shape == (2, 8, 8, 8)
    for c in range(2):
        low, high = np.percentile(data[..., c], (0.5, 99.5))
        assert np.allclose(out[c].numpy(), np.clip((data[..., c] - low) / (high - low), 0, 1), atol=1e-5)


# -- datalists ---------------------------------------------------------------------------------------------------
def _write_datalist(
    tmp_path: Path, training: list[dict], validation: list[dict] | None = None, **extra
) -> Path:
    def rel(e):
        return {k: str(Path(v).relative_to(tmp_path)) for k, v in e.items()}

    content = {"training": [rel(e) for e in training], **extra}
    if validation is not None:
        content["validation"] = [rel(e) for e in validation]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_datalist_resolves_paths_and_holds_out_validation(tmp_path):
    pairs = [_ct_pair(tmp_path, name=f"case{i}") for i in range(5)]
    path = _write_datalist(tmp_path, pairs, labels={"0": "background", "1": "organ", "2": "bone"})
    data = load_datalist(path, in_chans=1, val_fraction=0.4, seed=3)
    assert len(data.training) == 3 and len(data.validation) == 2
    assert sorted(e["image"] for e in data.training + data.validation) == sorted(e["image"] for e in pairs)
    assert data.labels == {"background": 0, "organ": 1, "bone": 2} and data.channels == 1
    again = load_datalist(path, in_chans=1, val_fraction=0.4, seed=3)
    assert again.validation == data.validation  # deterministic
    explicit = load_datalist(_write_datalist(tmp_path, pairs[:4], pairs[4:]), in_chans=1)
    assert explicit.validation == [pairs[4]] and len(explicit.training) == 4 and explicit.labels is None


def test_datalist_lists_every_bad_pair_by_file_name(tmp_path):
    good = _ct_pair(tmp_path, name="good")
    shape = _ct_pair(tmp_path, name="shape")
    write_nifti(Path(shape["label"]), np.zeros((20, 24, 11), np.uint8), lps_affine((1.3, 0.9, 2.7)))
    affine = _ct_pair(tmp_path, name="affine")
    write_nifti(Path(affine["label"]), np.zeros((20, 24, 12), np.uint8), lps_affine((1.3, 0.9, 2.0)))
    four_d = _ct_pair(tmp_path, name="fourd")
    write_nifti(Path(four_d["image"]), np.zeros((20, 24, 12, 2), np.int16), lps_affine((1.3, 0.9, 2.7)))
    missing = {"image": str(tmp_path / "images" / "gone.nii.gz"), "label": good["label"]}
    path = _write_datalist(tmp_path, [good, shape, affine, four_d, missing])
    with pytest.raises(DataError) as info:
        load_datalist(path, in_chans=1)
    message = str(info.value)
    assert "4 bad image/label pair(s)" in message
    assert "shape.nii.gz" in message and "image shape (20, 24, 12) != label shape (20, 24, 11)" in message
    assert "affine.nii.gz" in message and "affines differ" in message
    assert "fourd.nii.gz" in message and "4D image" in message and "3D volume" in message
    assert "gone.nii.gz" in message and "image file missing" in message
    assert "images/good.nii.gz" not in message  # the good pair is not listed


def test_datalist_channel_mismatch_with_the_backbone_names_both(tmp_path):
    pair = _ct_pair(tmp_path)
    path = _write_datalist(tmp_path, [pair])
    with pytest.raises(
        ConfigError, match=r"backbone takes 2 channel\(s\) but the images of .*datalist.json have 1"
    ):
        load_datalist(path, in_chans=2)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not a readable JSON"),
        (json.dumps({"validation": []}), 'non-empty "training"'),
        (json.dumps({"training": [{"image": "a.nii.gz"}]}), r'"training"\[0\]'),
    ],
)
def test_malformed_datalists_are_refused(tmp_path, content, match):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_datalist(path, in_chans=1)


def test_hold_out_keeps_at_least_one_for_training():
    entries = [{"image": str(i)} for i in range(3)]
    train, val = hold_out(entries, 0.9, seed=0)
    assert len(train) == 1 and len(val) == 2
    assert hold_out(entries, 0.0, seed=0) == (entries, [])


# -- training crops ------------------------------------------------------------------------------------------------
SMALL_META = seg_meta(roi_size=(16, 16, 16), spacing=None, modality="ct", num_classes=3)


def _small_pair(tmp_path: Path, shape=(10, 12, 6)) -> dict[str, str]:
    hu = np.full(shape, -1000, np.int16)
    hu[2:8, 3:9, 1:5] = 40
    labels = np.zeros(shape, np.uint8)
    labels[4:6, 5:7, 2:4] = 1
    image = write_nifti(tmp_path / "small_img.nii.gz", hu, lps_affine())
    label = write_nifti(tmp_path / "small_lbl.nii.gz", labels, lps_affine())
    return {"image": str(image), "label": str(label)}


def test_volumes_smaller_than_the_roi_are_padded_not_refused(tmp_path):
    dataset = SegmentationCropDataset(
        [_small_pair(tmp_path)], SMALL_META, seed=0, flip_prob=0.5, rot90_prob=0.5
    )
    sample = dataset[0]
    assert sample["image"].shape == (1, 16, 16, 16) and sample["label"].shape == (1, 16, 16, 16)
    assert type(sample["image"]) is torch.Tensor  # plain tensors, no MONAI metadata to collate
    assert float(sample["label"].sum()) == 8  # the whole organ is inside the padded crop
    assert float(sample["image"].max()) > 0


def test_crops_are_a_pure_function_of_seed_and_index(tmp_path):
    pair = _ct_pair(tmp_path, shape=(40, 40, 20))
    meta = replace(SMALL_META, roi_size=(16, 16, 16))
    a = SegmentationCropDataset([pair], meta, seed=0, flip_prob=0.5, rot90_prob=0.5)
    b = SegmentationCropDataset([pair], meta, seed=0, flip_prob=0.5, rot90_prob=0.5)
    for i in (5, 0, 3):  # any order: no hidden state between items
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    assert len({float(a[i]["image"].sum()) for i in range(6)}) > 1  # different indices, different crops
    other = SegmentationCropDataset([pair], meta, seed=1, flip_prob=0.5, rot90_prob=0.5)
    assert not all(torch.equal(a[i]["image"], other[i]["image"]) for i in range(4))


def test_half_the_crops_are_centred_on_foreground(tmp_path):
    pair = _ct_pair(tmp_path, shape=(60, 60, 30))
    labels = np.zeros((60, 60, 30), np.uint8)
    labels[5:9, 5:9, 5:9] = 1  # a small organ in one corner: random crops would rarely see it
    write_nifti(Path(pair["label"]), labels, lps_affine((1.3, 0.9, 2.7)))
    dataset = SegmentationCropDataset([pair], replace(SMALL_META, roi_size=(16, 16, 16)), seed=0)
    hits = sum(float(dataset[i]["label"].sum()) > 0 for i in range(20))
    assert 5 <= hits <= 16


def test_label_values_beyond_the_classes_name_the_file(tmp_path):
    pair = _small_pair(tmp_path)
    with pytest.raises(DataError, match=r"small_lbl.nii.gz: label values 0..1 outside the 1 classes"):
        prepare_volume(pair, replace(SMALL_META, num_classes=1))
