"""FSDP2 and sharded (DCP) checkpoints, multi-node rendezvous, activation checkpointing and torch.compile, on CPU
with gloo: each is compared with the plain run it must equal. Two-block tiny ViTs, four steps."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foundation.cli import main as cli_main
from foundation.config import load_config
from foundation.errors import CheckpointError, ConfigError
from foundation.export import load_backbone
from foundation.train import dcp
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain
from foundation.train.finetune import finetune

CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# KoLeo is per rank (as in DINOv2): the one term that differs between world sizes, so it is off here.
SMALL = ["model.model_args={depth: 2}", "train.steps=4", "ssl.koleo_loss_weight=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(
    recipe: Path,
    data: Path,
    out: Path,
    *overrides: str,
    nnodes: int = 1,
    node_rank: int = 0,
    nproc: int = 2,
    port: int | None = None,
    **kwargs,
) -> subprocess.Popen:
    """``torchrun`` with c10d rendezvous on 127.0.0.1 (a port of our own: other jobs may run torchrun here)."""
    launcher = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port or _free_port()}", "--rdzv-id", "test",
    ]  # fmt: skip
    args = ["-m", "foundation", "pretrain", "--config", str(recipe), "--data", str(data), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, *args, "--quiet", *SMALL, *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


def _in_process(recipe: Path, data: Path, out: Path, *overrides: str) -> Path:
    torch.set_num_threads(1)
    pretrain(load_config(recipe, [f"data.path={data}", *SMALL, *overrides]), out, CPU1, quiet=True)
    return out


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def _assert_same_run(got: Path, ref: Path, rel: float = 1e-5, atol: float = 1e-6) -> None:
    ref_losses, losses = _losses(ref), _losses(got)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=rel, abs=atol), step
    ref_w, got_w = _weights(ref), _weights(got)
    assert ref_w.keys() == got_w.keys()
    for key, value in ref_w.items():
        torch.testing.assert_close(got_w[key], value, rtol=max(rel, 1e-5) * 10, atol=atol * 10)


def _rewind(run: Path, to: Path, step: int) -> Path:
    """A copy of a finished run as it was after checkpoint ``step`` (later checkpoints and export removed)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "export")
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1].split(".")[0]) > step:
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    return to


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_recipe_text) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(tiny_recipe_text)
    return path


@pytest.fixture(scope="module")
def runs(recipe, image_folder, tmp_path_factory) -> dict[str, Path]:
    """Reference runs, 2 processes each, made side by side: DDP and FSDP (which also runs the kNN monitor on its
    gathered teacher backbone; monitoring changes no loss)."""
    root = tmp_path_factory.mktemp("runs")
    ddp = _torchrun(recipe, image_folder, root / "ddp2")
    knn = [
        f"eval.knn.train={image_folder}",
        f"eval.knn.val={image_folder}",
        "eval.every=2",
        "eval.images=false",
    ]
    fsdp = _torchrun(recipe, image_folder, root / "fsdp2", "train.parallel=fsdp", *knn)
    _finish(ddp, fsdp)
    return {"ddp2": root / "ddp2", "fsdp2": root / "fsdp2"}


# -- part 1: FSDP2 ------------------------------------------------------------------------------------------
def test_fsdp_equals_ddp(runs):
    _assert_same_run(runs["fsdp2"], runs["ddp2"])
    records = [json.loads(x) for x in (runs["fsdp2"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn/top1" in r] == [1, 3]
    shards = sorted(p.name for p in (runs["fsdp2"] / "checkpoints" / "step_00000004").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def test_mae_ddp_and_fsdp_equal_one_process(recipe, image_folder, tmp_path):
    # MAE's loss is a mean over samples: 2 ranks give the single process's numbers, with DDP and sharded (its
    # decoder blocks are FSDP units too). DDP once refused MAE: the encoder's mask token had no gradient.
    mae = ["ssl.method=mae", "ssl.decoder_dim=32", "ssl.decoder_depth=2", "ssl.decoder_heads=2"]
    ddp = _torchrun(recipe, image_folder, tmp_path / "ddp", *mae)
    fsdp = _torchrun(recipe, image_folder, tmp_path / "fsdp", "train.parallel=fsdp", *mae)
    one = _in_process(recipe, image_folder, tmp_path / "one", *mae)
    _finish(ddp, fsdp)
    _assert_same_run(tmp_path / "ddp", one, rel=1e-4, atol=1e-5)
    _assert_same_run(tmp_path / "fsdp", one, rel=1e-4, atol=1e-5)


def test_fsdp_in_one_process_is_ddp_equivalent(recipe, image_folder, runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="foundation.train.parallel"):
        one = _in_process(recipe, image_folder, tmp_path / "one", "train.parallel=fsdp")
    assert "train.parallel=fsdp with a world size of 1: DDP-equivalent" in caplog.text
    assert (one / "checkpoints" / "step_00000004" / "__0_0.distcp").is_file()
    _assert_same_run(one, runs["fsdp2"], rel=1e-4, atol=1e-5)  # 1 and 2 ranks: float rounding only


def test_fsdp_on_one_rank_under_torchrun_shards_over_a_mesh_of_one(recipe, image_folder, runs, tmp_path):
    # the path benchmarks/gpu_check.sh takes on one GPU: a process group of one, fully_shard over it
    proc = _torchrun(recipe, image_folder, tmp_path / "run", "train.parallel=fsdp", nproc=1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "DDP-equivalent" in err and "FSDP over a 1-rank mesh" in err
    _assert_same_run(tmp_path / "run", runs["fsdp2"], rel=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fsdp_bf16_on_one_rank(recipe, image_folder, tmp_path):
    # bf16 gathered weights and compute, fp32 shards and reduction: close to DDP's bf16 autocast, not equal
    runs = {}
    for parallel in ("ddp", "fsdp"):
        proc = _torchrun(
            recipe,
            image_folder,
            tmp_path / parallel,
            f"train.parallel={parallel}",
            "--device",
            "cuda",
            nproc=1,
        )
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        runs[parallel] = _losses(tmp_path / parallel)
    for step, loss in runs["ddp"].items():
        assert runs["fsdp"][step] == pytest.approx(loss, rel=2e-2), step
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000004" / "__0_0.distcp").is_file()


# -- part 2: sharded checkpoints ----------------------------------------------------------------------------
def test_fsdp_resume_after_sigkill_is_exact(recipe, image_folder, runs, tmp_path):
    out = tmp_path / "killed"
    proc = _torchrun(recipe, image_folder, out, "train.parallel=fsdp", start_new_session=True)
    first = out / "checkpoints" / "step_00000002"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    proc.wait()
    assert not (out / "export").exists(), "the run finished before it could be killed"
    resumed = _torchrun(recipe, image_folder, out, "train.parallel=fsdp")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    _assert_same_run(out, runs["fsdp2"])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_fsdp_sigterm_writes_a_complete_sharded_checkpoint(recipe, image_folder, tmp_path):
    # as a scheduler sends it: to the launcher and both workers; each rank writes its shards, then they exit
    out = tmp_path / "run"
    proc = _torchrun(
        recipe,
        image_folder,
        out,
        "train.parallel=fsdp",
        "train.steps=400",
        "train.checkpoint_every=1000",
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "SIGTERM: writing a checkpoint" in err
    (ckpt,) = (out / "checkpoints").iterdir()
    assert ckpt.name.startswith("step_") and 0 < int(ckpt.name.split("_")[1]) < 400
    dcp.check_complete(ckpt)
    assert not (out / "export").exists()


def test_two_ranks_checkpoint_resumes_in_one_process(recipe, image_folder, runs, tmp_path, caplog):
    run = _rewind(runs["fsdp2"], tmp_path / "run", step=2)
    with caplog.at_level(logging.WARNING):
        _in_process(recipe, image_folder, run, "train.parallel=fsdp")
    assert "world size changed (2 -> 1)" in caplog.text
    _assert_same_run(run, runs["fsdp2"], rel=1e-4, atol=1e-5)


def test_one_process_checkpoint_resumes_on_two_ranks(recipe, image_folder, runs, tmp_path):
    one = _in_process(recipe, image_folder, tmp_path / "one", "train.parallel=fsdp", "train.steps=4")
    run = _rewind(one, tmp_path / "run", step=2)
    resumed = _torchrun(recipe, image_folder, run, "train.parallel=fsdp")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "world size changed (1 -> 2)" in err
    _assert_same_run(run, runs["fsdp2"], rel=1e-4, atol=1e-5)


def test_export_consolidates_a_sharded_checkpoint(runs, tmp_path, capsys):
    # the run's last checkpoint holds the weights its export was made from; no process group here
    assert (
        cli_main(
            ["export", str(runs["fsdp2"] / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "e")]
        )
        == 0
    )
    ref = _weights(runs["fsdp2"])
    got = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 2


def test_checkpoint_with_a_missing_rank_file_is_refused(recipe, image_folder, runs, tmp_path):
    run = _rewind(runs["fsdp2"], tmp_path / "run", step=4)
    (run / "checkpoints" / "step_00000004" / "__1_0.distcp").unlink()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(
        CheckpointError,
        match=r"step_00000004 is incomplete: shard file __1_0.distcp \(written by rank 1\) is missing",
    ):
        _in_process(recipe, image_folder, run, "train.parallel=fsdp")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing resumed, nothing lost
    with pytest.raises(CheckpointError, match="__1_0.distcp"):
        load_backbone(run)  # foundation export refuses it the same way


def test_finetune_refuses_fsdp(tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="train.parallel='fsdp' is for pretraining"):
        finetune(None, cfg, Path("unused"), CPU1)


# -- part 4: several nodes ----------------------------------------------------------------------------------
def test_two_nodes_equal_one_node_with_two_processes(recipe, image_folder, runs, tmp_path):
    # exactly the README's recipe: the same command on each node, torchrun's c10d rendezvous at one endpoint
    port = _free_port()
    nodes = [
        _torchrun(recipe, image_folder, tmp_path / "run", nnodes=2, node_rank=rank, nproc=1, port=port)
        for rank in (0, 1)
    ]
    _finish(*nodes)
    _assert_same_run(tmp_path / "run", runs["ddp2"])


# -- part 3: activation checkpointing and torch.compile -----------------------------------------------------
# global crops only: one input shape, so torch.compile compiles each block graph once (CPU codegen is slow)
THREE_STEPS = ["train.steps=3", "data.crops.n_local=0"]


@pytest.fixture(scope="module")
def eager(recipe, image_folder, tmp_path_factory) -> Path:
    return _in_process(recipe, image_folder, tmp_path_factory.mktemp("eager") / "run", *THREE_STEPS)


def test_activation_checkpointing_equals_eager(recipe, image_folder, eager, tmp_path):
    run = _in_process(
        recipe, image_folder, tmp_path / "run", *THREE_STEPS, "train.activation_checkpointing=true"
    )
    _assert_same_run(run, eager)


def test_compiled_blocks_equal_eager(recipe, image_folder, eager, tmp_path):
    run = _in_process(recipe, image_folder, tmp_path / "run", *THREE_STEPS, "train.compile=true")
    _assert_same_run(run, eager, rel=1e-4, atol=1e-5)  # inductor's fused kernels round differently


def test_activation_checkpointing_with_fsdp_equals_fsdp(recipe, image_folder, runs, tmp_path):
    proc = _torchrun(
        recipe, image_folder, tmp_path / "run", "train.parallel=fsdp", "train.activation_checkpointing=true"
    )
    _finish(proc)
    _assert_same_run(tmp_path / "run", runs["fsdp2"])
