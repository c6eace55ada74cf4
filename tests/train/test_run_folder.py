"""A run folder is ours before we write in it: a user's folder is refused untouched, a second trainer is locked
out (a dead one's lock is taken over), and resume refuses another command, domain, objective or architecture
before a byte changes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from foundation.config import load_config
from foundation.errors import CheckpointError, OutputError
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain
from foundation.train.lock import RunLock, RunLockedError

CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
QUICK = ["train.steps=2", "train.checkpoint_every=2"]


def _pretrain(recipe, data, out, *overrides):
    torch.set_num_threads(1)
    pretrain(load_config(recipe, [f"data.path={data}", *QUICK, *overrides]), out, CPU1, quiet=True)
    return out


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_user_files_is_not_a_run(tiny_recipe, image_folder, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "metrics.jsonl").write_text('{"my": 1}\n')
    before = _snapshot(mine)
    with pytest.raises(OutputError, match="folder of other files, not a run folder; nothing was changed"):
        _pretrain(tiny_recipe, image_folder, mine)
    assert _snapshot(mine) == before


_HOLD = (
    "import sys, time; from foundation.train.lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)\n"
)


def test_a_live_trainer_locks_the_run_out_and_a_dead_ones_lock_is_taken_over(
    tiny_recipe, image_folder, tmp_path, caplog
):
    run = _pretrain(tiny_recipe, image_folder, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run)
        with pytest.raises(RunLockedError, match=f"in use: pid {holder.pid} on host {socket.gethostname()}"):
            _pretrain(tiny_recipe, image_folder, run, "train.steps=4")
        assert _snapshot(run) == before  # nothing written
    finally:
        holder.kill()  # SIGKILL: its lock file stays, its kernel lock goes
        holder.wait()
    assert (run / ".lock").is_file()
    _pretrain(tiny_recipe, image_folder, run, "train.steps=4")
    assert "taking over the lock" in caplog.text
    assert (run / "export" / "model.safetensors").is_file() and not (run / ".lock").exists()


def test_two_processes_taking_a_stale_lock_at_once_never_both_win(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": socket.gethostname()}))
    code = (
        "import sys, time; from foundation.train.lock import RunLock, RunLockedError\n"
        "time.sleep(float(sys.argv[2]) - time.time())\n"
        "try:\n    RunLock(sys.argv[1]).acquire(); print('won', flush=True); time.sleep(1.5)\n"
        "except RunLockedError:\n    print('refused', flush=True)\n"
    )
    for _ in range(5):
        start = time.time() + 1.0
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        results = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
        assert results == ["refused", "refused", "won"], results


def test_the_lock_refuses_a_second_holder_and_releases(tmp_path):
    first = RunLock(tmp_path).acquire()
    code = (
        "import sys; from foundation.train.lock import RunLock, RunLockedError\n"
        "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockedError as e:\n    print(e); sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout
    first.release()
    assert not (tmp_path / ".lock").exists()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["domain=pathology"], "domain: 'images' in the run, 'pathology' now"),
        (["ssl.method=mae"], "ssl_method: 'dinov2' in the run, 'mae' now"),
        (["model.reg_tokens=2"], "was written for backbone"),
    ],
)
def test_resume_of_another_run_is_refused_before_anything_changes(
    tiny_recipe, image_folder, tmp_path, change, message
):
    run = _pretrain(tiny_recipe, image_folder, tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=message):
        _pretrain(tiny_recipe, image_folder, run, "train.steps=4", *change)
    assert _snapshot(run) == before  # config.yaml included


def test_a_metrics_line_cut_by_a_kill_does_not_stop_resume(tiny_recipe, image_folder, tmp_path, caplog):
    run = _pretrain(tiny_recipe, image_folder, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 6.9')  # cut mid-record
    _pretrain(tiny_recipe, image_folder, run, "train.steps=4")
    assert "not a whole JSON record" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def test_a_full_disk_at_checkpoint_time_is_named_and_leaves_nothing(
    tiny_recipe, image_folder, small_disk, capsys
):
    from foundation.cli import main

    disk = small_disk(2048)  # the config fits, a checkpoint (~100 MB) does not
    out = disk / "run"
    argv = [
        "pretrain",
        "--config",
        str(tiny_recipe),
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*argv, *QUICK]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000002.pt: cannot write (no space left on device)" in err[0], err
    assert list(disk.iterdir()) == []  # no run that looks started, no hidden temporary
