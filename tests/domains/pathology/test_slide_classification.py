"""``foundation finetune|evaluate slide-classification`` end to end on synthetic bags with a planted signal."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from slide_bags import planted_cohort, write_bag

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.train import checkpoint as ckpt
from foundation_domains.pathology.slide_classification.bags import read_bag
from foundation_domains.pathology.slide_classification.inference import run_bag
from foundation_domains.pathology.slide_classification.task import SlideClassificationTask

SMALL = [
    "task.options.hidden=32", "task.options.attention_dim=16", "task.options.dropout=0.0", "task.options.folds=3",
    "optim.lr=5e-3", "train.batch_size=6", "train.eval_every=10", "train.log_every=10",
]  # fmt: skip


def _finetune(feats: Path, labels: Path, out: Path, *overrides: str) -> int:
    argv = ["finetune", "slide-classification", "--features", str(feats), "--labels", str(labels)]
    return main([*argv, "--out", str(out), "--quiet", *SMALL, *overrides])


def _evaluate(
    run: Path, feats: Path, labels: Path, capsys: pytest.CaptureFixture, *extra: str
) -> tuple[int, dict]:
    capsys.readouterr()
    argv = ["evaluate", "slide-classification", "--checkpoint", str(run), "--features", str(feats)]
    code = main([*argv, "--labels", str(labels), "--quiet", "--bootstrap", "100", *extra])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_abmil_beats_mean_pooling_and_finds_the_planted_tiles(
    tmp_path: Path, capsys: pytest.CaptureFixture, single_thread: None
) -> None:
    feats, labels = tmp_path / "feats", tmp_path / "labels.csv"
    planted = planted_cohort(feats, labels, per_class=10, tiles=(40, 70), planted=2, signal=8.0)
    result = {}
    for head in ("abmil", "mean"):
        assert _finetune(feats, labels, tmp_path / head, f"task.options.head={head}", "train.steps=80") == 0
        code, result[head] = _evaluate(tmp_path / head, feats, labels, capsys)
        assert code == EXIT_DONE and result[head]["done"] == 20
    assert result["abmil"]["auroc"] >= 0.95
    assert result["abmil"]["auroc"] > result["mean"]["auroc"] + 0.1
    # a binary model finds one class by its tiles (the other is "none of those"): in that class's slides the two
    # most attended tiles are the planted ones (each fold on its own test slides)
    model = SlideClassificationTask().load(tmp_path / "abmil")
    net, meta = model.net, model.meta.to_dict()
    found: dict[str, list[float]] = {"s0_": [], "s1_": []}
    for k, split in enumerate(meta["splits"]):
        for slide in split["test"]:
            out = run_bag(net.head_for_inference(k), read_bag(feats / f"{slide}.h5"), torch.device("cpu"))
            top = set(out["attention"].topk(2).indices.tolist())
            found[slide[:3]].append(len(top & set(planted[slide].tolist())) / 2)
    assert max(np.mean(v) for v in found.values()) >= 0.9


def test_multiclass_cohort_with_cases_and_missing_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture, single_thread: None
) -> None:
    feats, labels = tmp_path / "feats", tmp_path / "labels.csv"
    planted_cohort(feats, labels, per_class=8, classes=3, tiles=(60, 100), slides_per_case=2)
    write_bag(feats / "unlabelled.h5", np.ones((5, 16)))  # features without a label
    write_bag(feats / "empty.h5", np.zeros((0, 16)))  # an empty bag
    with open(labels, "a") as f:
        f.write("ghost,c0,p_ghost\nempty,c1,p_empty\n")  # a label without features; the empty bag's row
    run = tmp_path / "run"
    assert _finetune(feats, labels, run, "train.steps=40", "task.options.balanse=none") == EXIT_NOTHING_DONE
    assert "task.options.balanse is not an option of slide-classification" in capsys.readouterr().err
    assert not run.exists()
    assert _finetune(feats, labels, run, "train.steps=40", "task.options.instance_loss=true") == 0
    meta = SlideClassificationTask().load(run).meta.to_dict()
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["folds"] == 3
    assert {s["slide"] for s in meta["skipped"]} == {"unlabelled", "empty", "ghost"}
    case = {s: f"p{s[1]}_{int(s[3:]) // 2:02d}" for split in meta["splits"] for s in split["test"]}
    for split in meta["splits"]:  # both slides of a case in the same split
        parts = [{case[s] for s in split[name]} for name in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])

    code, result = _evaluate(run, feats, labels, capsys, "--heatmaps", str(tmp_path / "heat"))
    assert code == EXIT_SOME_SKIPPED  # scored the rest, said which were skipped
    assert result["heatmaps_drawn"] == 24 and len(list((tmp_path / "heat").glob("s*.png"))) == 24
    assert {s["slide"] for s in result["skipped"]} == {"unlabelled", "empty", "ghost"}
    assert "empty.h5: empty bag" in next(s["reason"] for s in result["skipped"] if s["slide"] == "empty")
    assert result["done"] == 24 and [f["fold"] for f in result["folds"]] == [0, 1, 2]
    for name in ("auroc", "balanced_accuracy", "f1"):
        values = [f[name] for f in result["folds"]]
        assert result[name] == pytest.approx(np.mean(values)) and result[f"{name}_std"] == pytest.approx(
            np.std(values)
        )
        assert all(lo <= f[name] <= hi for f in result["folds"] for lo, hi in [f[f"{name}_ci"]])
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide", "case", "fold", "label", "prob_c0", "prob_c1", "prob_c2"]
    assert sorted(r["slide"] for r in rows) == sorted(case)  # every slide once, by the fold that held it out
    assert all(abs(sum(float(r[f"prob_c{c}"]) for c in range(3)) - 1) < 1e-4 for r in rows)
    assert all(r["case"] == case[r["slide"]] for r in rows)

    # a file that is not ours is never replaced; features of another width are refused by name
    (tmp_path / "mine.csv").write_text("my,notes\n")
    assert main(["evaluate", "slide-classification", "--checkpoint", str(run), "--features", str(feats),
                 "--labels", str(labels), "--out", str(tmp_path / "mine.csv"), "--quiet"]) == EXIT_NOTHING_DONE  # fmt: skip
    assert (tmp_path / "mine.csv").read_text() == "my,notes\n"
    other = tmp_path / "other"
    other.mkdir()
    write_bag(other / "s0_00.h5", np.ones((5, 8)))
    assert main(["evaluate", "slide-classification", "--checkpoint", str(run), "--features", str(other),
                 "--labels", str(labels), "--quiet"]) == EXIT_NOTHING_DONE  # fmt: skip
    assert "8-wide features; the model was trained on 16-wide" in capsys.readouterr().err


def test_early_stopping_ends_the_run_and_a_rerun_is_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, single_thread: None
) -> None:
    feats, labels = tmp_path / "feats", tmp_path / "labels.csv"
    planted_cohort(feats, labels, per_class=6, tiles=(20, 30))
    run = tmp_path / "run"
    # a learning rate too small to improve the validation loss: every fold stops after its second validation
    args = [
        "train.steps=400",
        "train.eval_every=5",
        "task.options.patience=1",
        "optim.lr=1e-9",
        "optim.min_lr=0",
    ]
    assert _finetune(feats, labels, run, *args) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 9  # validated at steps 5 and 10, then stopped
    assert ckpt.latest_checkpoint(run).name == "step_00000400.pt" and (run / "model.pt").is_file()
    assert not (run / "export").exists()  # no backbone to export
    net = SlideClassificationTask().load(run).net
    assert net.has_best.all() and (net.evals_since_best == 1).all()
    caplog.clear()
    assert _finetune(feats, labels, run, *args) == 0
    assert "(step 400 of 400)" in caplog.text  # resumed at its end: nothing more to train
    # other labels give other splits: that run is not resumed on them
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    stamp = (run / "model.pt").stat().st_mtime_ns
    assert _finetune(feats, labels, run, *args) == EXIT_NOTHING_DONE
    assert "splits_sha256" in capsys.readouterr().err and (run / "model.pt").stat().st_mtime_ns == stamp


def test_saved_config_reproduces_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    """The features and labels are in RUN/config.yaml (absolute): `finetune slide-classification --config
    RUN/config.yaml`, without flags and from another folder, trains the same weights."""
    planted_cohort(
        tmp_path / "feats", tmp_path / "labels.csv", per_class=4, tiles=(10, 20), planted=2, signal=8.0
    )
    monkeypatch.chdir(tmp_path)
    assert _finetune(Path("feats"), Path("labels.csv"), tmp_path / "first", "train.steps=4") == 0
    saved = (tmp_path / "first" / "config.yaml").read_text()
    assert f"features: {tmp_path / 'feats'}" in saved and f"labels: {tmp_path / 'labels.csv'}" in saved
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["finetune", "slide-classification", "--config", str(tmp_path / "first" / "config.yaml")]
    assert main([*argv, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = (torch.load(tmp_path / r / "model.pt", weights_only=True) for r in ("first", "again"))
    assert first["task_meta"] == again["task_meta"]
    assert all(torch.equal(first["net"][k], again["net"][k]) for k in first["net"])
    assert main([*argv[:2], "--out", str(tmp_path / "none"), "--quiet"]) == 1  # no inputs at all: named
