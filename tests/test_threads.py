"""Thread sizing: CPUs from the affinity mask and cgroup quota, less loader workers; the user's choice wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from foundation import threads
from foundation.cli import main
from foundation.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("FOUNDATION_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", threads._OURS):
        monkeypatch.setenv(name, "")  # recorded, so what a test (or --threads) sets is undone afterwards
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_main_process_gets_the_cpus_its_loader_workers_leave():
    assert threads.plan_threads(0, cpus=8).intra_op == 8
    assert threads.plan_threads(2, cpus=8).intra_op == 6
    assert threads.plan_threads(2, cpus=2).intra_op == 1  # never zero
    assert threads.plan_threads(4, cpus=1).intra_op == 1


def test_local_ranks_share_the_cpus(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.plan_threads(1, cpus=16).intra_op == 3  # 16 / 4 ranks, less one worker


def test_the_users_number_wins_and_off_leaves_torch_alone(monkeypatch):
    assert threads.plan_threads(2, cpus=2, requested=5).intra_op == 5
    assert threads.plan_threads(2, cpus=2, requested="off").intra_op is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own OpenMP setting counts as a request
    assert threads.requested_threads() == 3
    monkeypatch.setenv(threads._OURS, "1")  # ... unless it was our own automatic choice
    assert threads.requested_threads() is None
    monkeypatch.setenv("FOUNDATION_THREADS", "off")
    assert threads.requested_threads() == "off"


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5"])
def test_a_bad_thread_count_is_refused_with_the_variable_named(bad):
    with pytest.raises(ConfigError, match="FOUNDATION_THREADS"):
        threads.requested_threads(bad)


def test_cgroup_quota_v2_and_v1(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_quota(tmp_path / "v1") is None
    # A 1.5-CPU quota on a bigger affinity mask: two threads (rounded up), never more than the mask.
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads.available_cpus() == 2


def test_threads_option_reaches_torch_for_any_command(capsys):
    assert main(["info", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_threads"] == 1
    assert torch.get_num_threads() == 1


def test_bad_threads_option_is_one_error_line(capsys):
    assert main(["info", "--threads", "lots"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "FOUNDATION_THREADS" in err[0]


def test_openmp_spins_briefly_unless_the_user_says_otherwise():
    code = "import os, foundation; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FOUNDATION_THREADS")
    }
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run({}) == "1000"
    assert run({"GOMP_SPINCOUNT": "50"}) == "50"
    assert run({"OMP_WAIT_POLICY": "PASSIVE"}) == "None"  # the user's policy decides the spinning
    assert run({"FOUNDATION_THREADS": "off"}) == "None"
