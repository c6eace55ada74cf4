"""`foundation finetune organ-segmentation` end to end on the synthetic phantoms: Dice improves over training,
the run resumes exactly, `foundation evaluate` prints per-organ Dice, bad set-ups are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from foundation.batch import EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.config import load_config
from foundation.errors import ConfigError
from foundation.models.vit import build_vit
from foundation_domains.medical.segmentation.datalist import sample_datalist
from foundation_domains.medical.segmentation.task import OrganSegmentationTask

RECIPE = """\
seed: 0
domain: medical
model: {{arch: vit_tiny, patch_size: 16, img_size: 32, spatial_dims: 3, layerscale_init: null}}
data: {{num_workers: 0, options: {{modality: ct, spacing: [3.0, 3.0, 4.0], window: [-175, 250]}}}}
task: {{options: {{roi_size: {roi}, feature_size: {fs}, sw_batch_size: 4}}}}
optim: {{lr: 1.0e-3, lr_scaling: none, warmup_steps: 3, min_lr: 1.0e-5, weight_decay: 0.01, weight_decay_end: 0.01,
        layer_decay: 1.0, patch_embed_lr_mult: 1.0, clip_grad: 1.0, freeze_last_layer_steps: 0}}
train: {{steps: {steps}, batch_size: 2, checkpoint_every: {every}, log_every: 1, eval_every: {every}}}
"""
STEPS = 30


def _recipe(folder: Path, *, roi=32, fs=16, steps=STEPS, every=STEPS // 2) -> Path:
    path = folder / f"organseg_{roi}_{steps}.yaml"
    path.write_text(RECIPE.format(roi=roi, fs=fs, steps=steps, every=every))
    return path


def _finetune(recipe: Path, out: Path, *extra: str) -> int:
    argv = ["finetune", "organ-segmentation", "--random-init", "--config", str(recipe), "--out", str(out)]
    return main([*argv, "--quiet", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread) -> tuple[Path, Path]:
    """A short fine-tune on the phantoms, stopped halfway and resumed: (run folder, recipe)."""
    folder = tmp_path_factory.mktemp("organseg")
    recipe = _recipe(folder)
    run = folder / "run"
    assert _finetune(recipe, run, f"train.steps={STEPS // 2}") == 0
    (run / "model.pt").unlink()
    assert _finetune(recipe, run) == 0  # resumes at the halfway checkpoint
    return run, recipe


def _untrained_dice(recipe: Path) -> float:
    """Validation Dice of the same network before any step (same seed, same head initialisation)."""
    cfg = load_config(recipe, [], pretraining=False, task=OrganSegmentationTask(), domain="medical")
    torch.manual_seed(cfg.seed)
    backbone = build_vit("vit_tiny", in_chans=1, spatial_dims=3, img_size=32, patch_size=16)
    parts = OrganSegmentationTask().build(cfg, backbone, {"source": "random-init"})
    with torch.no_grad():
        return parts.validate(parts.net.eval(), torch.device("cpu"))["dice_mean"]


def test_dice_improves_over_training(trained):
    run, recipe = trained
    val = [r for r in _records(run) if "val/dice_mean" in r]
    assert [r["step"] for r in val] == [STEPS // 2 - 1, STEPS - 1]
    before = _untrained_dice(recipe)
    after = val[-1]["val/dice_mean"]
    assert after > before + 0.2, (before, after)
    assert val[-1]["val/dice/liver"] > 0.5  # the largest organ is found first
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_model_file_carries_what_inference_needs(trained):
    run, _ = trained
    model = OrganSegmentationTask().load(run)
    net, meta = model.net, model.meta.to_dict()
    assert set(meta) == {
        "head",
        "in_chans",
        "roi_size",
        "spacing",
        "modality",
        "window",
        "labels",
        "num_classes",
        "overlap",
        "sw_batch_size",
    }
    assert meta["labels"]["liver"] == 1 and meta["labels"]["background"] == 0 and meta["num_classes"] == 6
    assert meta["roi_size"] == [32, 32, 32] and meta["spacing"] == [3.0, 3.0, 4.0] and meta["overlap"] == 0.5
    json.dumps(meta)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 6, 32, 32, 32)


def test_evaluate_prints_per_organ_dice(trained, capsys, tmp_path):
    run, _ = trained
    capsys.readouterr()
    argv = ["evaluate", "organ-segmentation", "--checkpoint", str(run), "--data", str(sample_datalist())]
    assert main([*argv, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [r for r in _records(run) if "val/dice_mean" in r][-1]
    assert result["dice_mean"] == pytest.approx(last["val/dice_mean"], abs=1e-5)  # same volumes, same weights
    assert {"dice/liver", "dice/kidney_left", "dice/kidney_right", "dice/spleen", "dice/vertebra"} <= set(
        result
    )
    assert result["split"] == "validation" and result["volumes"] == 1
    plots = tmp_path / "plots"
    assert main([*argv, "--split", "training", "--quiet", "--plots", str(plots)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["volumes"] == 3
    assert [Path(p).name for p in result["plots"]][0] == "dice.png" and len(result["plots"]) == 4
    assert sorted(p.name for p in plots.glob("*.png")) == sorted(Path(p).name for p in result["plots"])


def test_resume_is_exact(tmp_path, single_thread):
    recipe = _recipe(tmp_path, roi=16, fs=4, steps=4, every=2)
    warmup = "optim.warmup_steps=2"  # the lr of steps 0-1 must not depend on train.steps (2 vs 4)
    assert _finetune(recipe, tmp_path / "full", warmup) == 0
    assert _finetune(recipe, tmp_path / "half", warmup, "train.steps=2") == 0
    (tmp_path / "half" / "model.pt").unlink()
    assert _finetune(recipe, tmp_path / "half", warmup) == 0
    full = {r["step"]: r["loss"] for r in _records(tmp_path / "full") if "loss" in r}
    half = {r["step"]: r["loss"] for r in _records(tmp_path / "half") if "loss" in r}
    assert half == pytest.approx(full, rel=1e-5) and sorted(half) == [0, 1, 2, 3]


def test_setup_errors_name_the_problem(tmp_path, capsys):
    recipe = _recipe(tmp_path, roi=24, steps=1, every=1)
    assert _finetune(recipe, tmp_path / "run") == 1
    assert (
        "roi_size=[24, 24, 24] must be multiples of the backbone's patch size 16" in capsys.readouterr().err
    )
    recipe = _recipe(tmp_path, steps=1, every=1)
    assert _finetune(recipe, tmp_path / "run", "model.in_chans=2") == 1
    assert "backbone takes 2 channel(s) but the images of" in capsys.readouterr().err
    assert _finetune(recipe, tmp_path / "run", "task.options.roi=32") == 1
    assert "task.options.roi is not an option of organ-segmentation" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="overlap"):
        from foundation_domains.medical.segmentation.task import SegmentationOptions

        SegmentationOptions.from_options({"overlap": 1.0})
    with pytest.raises(ConfigError, match="norm_name='group' is not one of"):
        SegmentationOptions.from_options({"norm_name": "group"})


def test_evaluate_skips_broken_and_nan_volumes_scores_the_rest(trained, tmp_path, capsys):
    run, _ = trained
    source = json.loads(sample_datalist().read_text())
    folder = sample_datalist().parent
    good = [{k: str((folder / v).resolve()) for k, v in e.items()} for e in source["training"][:2]]
    hu, labels = (nib.load(good[0][k]) for k in ("image", "label"))
    broken = {"image": str(tmp_path / "broken.nii"), "label": str(tmp_path / "broken_label.nii")}
    nib.save(nib.Nifti1Image(np.asarray(hu.dataobj), hu.affine), broken["image"])
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), labels.affine), broken["label"])
    with open(broken["image"], "r+b") as f:  # the header is intact, the voxel data is cut short
        f.truncate(Path(broken["image"]).stat().st_size // 2)
    nan = {"image": str(tmp_path / "nan.nii.gz"), "label": good[0]["label"]}
    nib.save(nib.Nifti1Image(np.full(hu.shape, np.nan, np.float32), hu.affine), nan["image"])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": good, "validation": [good[1], broken, nan]}))
    capsys.readouterr()
    argv = ["evaluate", "organ-segmentation", "--checkpoint", str(run), "--data", str(datalist), "--quiet"]
    assert main(argv) == EXIT_SOME_SKIPPED  # the other pair's scores are printed, the exit status says so
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["done"] == 1 and result["skipped"] == [broken["image"], nan["image"]]
    assert "dice_mean" in result


def test_dice_on_volumes_smaller_than_the_roi(tmp_path):
    from med_testdata import lps_affine, three_class_seg_meta, write_nifti

    from foundation_domains.medical.segmentation.task import DiceEvaluator

    labels = np.zeros((10, 12, 6), np.uint8)
    labels[3:7, 4:9, 1:4] = 1
    hu = np.where(labels == 1, 250, -175).astype(np.int16)  # the organ is exactly the bright voxels
    pair = {
        "image": str(write_nifti(tmp_path / "img.nii.gz", hu, lps_affine())),
        "label": str(write_nifti(tmp_path / "lbl.nii.gz", labels, lps_affine())),
    }
    meta = three_class_seg_meta()

    def oracle(x: torch.Tensor) -> torch.Tensor:  # windowed intensity 1 -> organ, 0 -> background
        assert x.shape[2:] == (16, 16, 16)  # padded up to the ROI, cropped back afterwards
        return torch.cat([1 - x, x, torch.full_like(x, -1.0)], 1) * 10

    scores = DiceEvaluator([pair], meta)(oracle, torch.device("cpu"))
    assert scores == {"dice/organ": pytest.approx(1.0), "dice_mean": pytest.approx(1.0)}  # "absent": no Dice
    scores = DiceEvaluator([pair], meta)(
        lambda x: torch.cat([x * 0 + 1, x * 0, x * 0], 1), torch.device("cpu")
    )
    assert scores == {"dice/organ": 0.0, "dice_mean": 0.0}


def test_the_shipped_recipe_is_valid():
    from foundation_domains.medical.options import VolumeOptions
    from foundation_domains.medical.segmentation.task import SegmentationOptions

    task = OrganSegmentationTask()
    assert task.default_config.is_file()
    cfg = load_config(task.default_config, [], pretraining=False, task=task, domain="medical")
    opts = cfg.task.typed_options
    assert isinstance(opts, SegmentationOptions) and isinstance(cfg.data.typed_options, VolumeOptions)
    assert all(s % cfg.model.patch_size == 0 for s in opts.roi_size) and opts.overlap == 0.5
    assert cfg.data.typed_options.modality == "ct"


def test_saved_config_reproduces_the_run_from_another_folder(tmp_path, monkeypatch, single_thread):
    """RUN/config.yaml holds the datalist (absolute) and the backbone choice: `finetune organ-segmentation
    --config RUN/config.yaml` alone, from another working directory, trains the same weights."""
    datalist = Path(sample_datalist())
    recipe = _recipe(tmp_path, steps=2, every=2)
    monkeypatch.chdir(datalist.parent)
    assert _finetune(recipe, tmp_path / "first", "--data", datalist.name, "train.eval_every=0") == 0
    saved = (tmp_path / "first" / "config.yaml").read_text()
    assert f"data: {datalist}" in saved and "random_init: true" in saved
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "organ-segmentation", "--config", str(tmp_path / "first" / "config.yaml")]
    assert main([*argv, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = (torch.load(tmp_path / r / "model.pt", weights_only=True) for r in ("first", "again"))
    assert first["task_meta"] == again["task_meta"]
    assert all(torch.equal(first["net"][k], again["net"][k]) for k in first["net"])
    assert [r.get("loss") for r in _records(tmp_path / "first")] == [
        r.get("loss") for r in _records(tmp_path / "again")
    ]
