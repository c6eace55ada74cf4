"""The training loop: exact resume after SIGKILL, SIGTERM checkpointing, DDP equivalence, non-finite guard,
and bad input. Runs real (tiny) pretraining on images written by the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foundation.config import load_config
from foundation.errors import CheckpointError, ConfigError, DataError, OutputError, TrainingError
from foundation.train.distributed import DistInfo
from foundation.train.engine import Trainer, pretrain, ssl_setup

CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "foundation", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def _run_in_process(recipe: Path, data: Path, out: Path, *overrides: str) -> Path:
    torch.set_num_threads(1)
    cfg = load_config(recipe, [f"data.path={data}", *overrides])
    pretrain(cfg, out, CPU1, quiet=True)
    return out


def test_pretrain_writes_a_complete_run(tiny_recipe, image_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="foundation.train.collapse"):
        run = _run_in_process(tiny_recipe, image_folder, tmp_path / "run")
    # the test recipe keeps DINOv2's LayerScale and teacher temperature in a 6-step run: both named at start
    prone = [r.getMessage() for r in caplog.records if "collapse-prone setting" in r.getMessage()]
    assert (
        len(prone) == 2 and "model.layerscale_init=1e-05" in prone[0] and "ssl.teacher_temp=0.07" in prone[1]
    )
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000002.pt",
        "step_00000004.pt",
        "step_00000006.pt",
    ]
    assert sorted(_losses(run)) == list(range(6))
    assert any((run / "tensorboard").iterdir())
    assert (run / "export" / "config.json").is_file()
    state = torch.load(run / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert state["step"] == 6
    assert {"model", "optimizer", "rng", "backbone_args"} <= set(state)


def test_resume_after_sigkill_is_exact(tiny_recipe, image_folder, tmp_path):
    steps = ["train.steps=14", "train.checkpoint_every=3"]
    reference = _run_in_process(tiny_recipe, image_folder, tmp_path / "reference", *steps)

    out = tmp_path / "killed"
    args = [
        "pretrain",
        "--config",
        str(tiny_recipe),
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--quiet",
        *steps,
    ]
    proc = _cli(*args)
    first = out / "checkpoints" / "step_00000003.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "export").exists(), "the run finished before it could be killed"

    resumed = _cli(*args)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    ref_losses, got = _losses(reference), _losses(out)
    assert sorted(got) == list(range(14))
    for step, loss in ref_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    ref_w, got_w = _weights(reference), _weights(out)
    for key, value in ref_w.items():
        torch.testing.assert_close(got_w[key], value, rtol=1e-5, atol=1e-6)


def test_the_thread_count_is_tuned_logged_and_checkpointed(tiny_recipe, image_folder, tmp_path, monkeypatch):
    for name in ("FOUNDATION_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("foundation.threads.available_cpus", lambda: 2)
    run = _run_in_process(
        tiny_recipe, image_folder, tmp_path / "run", "train.steps=20", "train.checkpoint_every=10"
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    threads = {r["step"]: r["threads"] for r in rows if "loss" in r}
    assert threads[0] == 2 and threads[6] == 1  # the first trial: every CPU, then one thread
    assert set(threads.values()) <= {1, 2}
    state = torch.load(run / "checkpoints" / "step_00000010.pt", weights_only=True)["thread_tuner"]
    assert (state["high"], state["low"], state["decided"]) == (2, 1, True)
    assert state["current"] in (1, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_writes_a_checkpoint_and_exits(workers, tiny_recipe, image_folder, tmp_path):
    # With workers, SIGTERM goes to the whole process group, as schedulers send it.
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(tiny_recipe), "--data", str(image_folder), "--out", str(out)]
    overrides = ["train.steps=400", "train.checkpoint_every=1000", f"data.num_workers={workers}"]
    proc = _cli(*args, *overrides, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    if workers:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpts = list((out / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].stem.split("_")[1]) < 400
    assert "SIGTERM" in err
    assert not (out / "export").exists()


def test_two_process_ddp_matches_one_process(tiny_recipe, image_folder, tmp_path):
    # KoLeo is computed per rank (as in DINOv2), so it is the one term that legitimately differs.
    common = ["--config", str(tiny_recipe), "--data", str(image_folder), "--quiet", "ssl.koleo_loss_weight=0"]
    single = _cli("pretrain", *common, "--out", str(tmp_path / "one"))
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    double = _cli("pretrain", *common, "--out", str(tmp_path / "two"), "--nproc", "2")
    _, err = double.communicate(timeout=300)
    assert double.returncode == 0, err
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(6))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    for key, value in _weights(tmp_path / "one").items():
        torch.testing.assert_close(_weights(tmp_path / "two")[key], value, rtol=1e-3, atol=1e-4)


def test_gradient_accumulation_matches_full_batch(tiny_recipe, image_folder, tmp_path):
    # MAE's loss is a plain mean over samples, so two half batches give exactly the full batch's gradient.
    # (DINOv2's teacher centre moves after every forward, so there the two differ slightly by design.)
    base = [
        "ssl.method=mae",
        "ssl.decoder_dim=32",
        "ssl.decoder_depth=1",
        "ssl.decoder_heads=2",
        "train.steps=3",
    ]
    full = _run_in_process(tiny_recipe, image_folder, tmp_path / "full", *base)
    accum = _run_in_process(tiny_recipe, image_folder, tmp_path / "accum", *base, "train.grad_accum_steps=2")
    for step, loss in _losses(full).items():
        assert _losses(accum)[step] == pytest.approx(loss, rel=1e-4)


def test_nonfinite_losses_skip_steps_then_stop(tiny_recipe, image_folder, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(
        tiny_recipe, [f"data.path={image_folder}", "train.steps=8", "train.max_nonfinite_in_a_row=3"]
    )
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, tmp_path / "run", CPU1, ssl_setup(cfg), quiet=True)
    real_forward = trainer.model.forward
    bad_steps = {1, 4, 5, 6}

    def forward(batch, step):
        losses = real_forward(batch, step)
        if step in bad_steps:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    trainer.model.forward = forward
    before = {k: v.clone() for k, v in trainer.objective.student.state_dict().items()}
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        trainer.train()
    assert trainer.nonfinite_total == 4
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped_nonfinite")] == [1, 4, 5, 6]
    after = trainer.objective.student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_empty_data_folder_leaves_no_run(tiny_recipe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images"):
        _run_in_process(tiny_recipe, empty, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_out_parent_is_refused(tiny_recipe, image_folder, tmp_path):
    with pytest.raises(OutputError, match="parent folder of --out"):
        _run_in_process(tiny_recipe, image_folder, tmp_path / "missing" / "run")


def test_batch_not_divisible_by_world_size(tiny_recipe, image_folder, tmp_path):
    cfg = load_config(tiny_recipe, [f"data.path={image_folder}"])
    three = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible by world size 3"):
        pretrain(cfg, tmp_path / "run", three, quiet=True)
    assert not (tmp_path / "run").exists()


def test_checkpoint_from_another_architecture_is_refused(tiny_recipe, image_folder, tmp_path):
    run = _run_in_process(tiny_recipe, image_folder, tmp_path / "run", "train.steps=2")
    with pytest.raises(CheckpointError, match="was written for backbone"):
        _run_in_process(tiny_recipe, image_folder, run, "train.steps=4", "model.reg_tokens=2")
    assert (run / "checkpoints" / "step_00000002.pt").is_file()  # the earlier run is untouched


def test_cli_reports_errors_with_exit_code(tmp_path):
    proc = _cli("pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--quiet")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "does not exist" in err and "nowhere" in err


def test_channel_override_that_contradicts_the_domain(tiny_recipe, image_folder, tmp_path):
    with pytest.raises(ConfigError, match="model.in_chans=4 does not match"):
        _run_in_process(tiny_recipe, image_folder, tmp_path / "run", "model.in_chans=4")
    assert not (tmp_path / "run").exists()


def test_folder_of_undecodable_images_stops_cleanly(tiny_recipe, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="could be decoded"):
        _run_in_process(tiny_recipe, broken, tmp_path / "run")
    assert "a.png" in caplog.text and "b.jpg" in caplog.text  # each broken file is named once
    assert not (tmp_path / "run").exists()
