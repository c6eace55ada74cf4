"""The training loop's thread tuner: keeps the faster count, follows a machine that gets busy or free again, and
continues exactly from its checkpointed state."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from foundation.thread_tuner import ThreadTuner, TunerSettings, tuner_for
from foundation.threads import ThreadPlan

SETTINGS = TunerSettings(warmup=2, window=3, recheck_every=10)
FIRST_TRIAL = SETTINGS.warmup + 2 * SETTINGS.window + 1  # steps before the first decision


def simulate(
    tuner: ThreadTuner, step_seconds: Callable[[int, int], float], steps: range
) -> tuple[list[int], list]:
    """Run ``steps`` against a machine where a step at ``n`` threads takes ``step_seconds(step, n)``; returns the
    count each step ran with and the switches reported."""
    counts, switches = [], []
    for step in steps:
        n = tuner.applied
        counts.append(n)
        switch = tuner.observe(step, step_seconds(step, n))
        if switch is not None:
            switches.append(switch)
    return counts, switches


def make(high: int = 2, low: int = 1) -> tuple[ThreadTuner, list[int]]:
    calls: list[int] = []
    return ThreadTuner(high, low, calls.append, SETTINGS), calls


def idle(step: int, n: int) -> float:
    return {1: 0.45, 2: 0.30}[n]


def busy(step: int, n: int) -> float:
    return {1: 0.46, 2: 0.65}[n]


def test_an_idle_machine_keeps_every_cpu_after_one_trial():
    tuner, calls = make()
    counts, switches = simulate(tuner, idle, range(60))
    assert counts[:FIRST_TRIAL] == [2] * 5 + [1] * 4  # warm-up and three timed steps each
    assert counts[FIRST_TRIAL:] == [2] * (60 - FIRST_TRIAL)  # no trial again while nothing changes
    assert [(s.step, s.threads) for s in switches] == [(FIRST_TRIAL - 1, 2)]  # the first choice is reported
    assert switches[0].seconds == {2: 0.3, 1: 0.45}
    assert calls == [2, 1, 2]  # torch.set_num_threads only when the count changes


def test_beside_a_busy_process_it_takes_fewer_threads():
    tuner, _ = make()
    counts, switches = simulate(tuner, busy, range(FIRST_TRIAL + 5))
    assert counts[FIRST_TRIAL:] == [1] * 5
    assert switches[-1].threads == 1


def test_a_near_tie_goes_to_fewer_threads():
    tuner, _ = make()
    counts, _ = simulate(tuner, lambda step, n: {1: 0.40, 2: 0.39}[n], range(FIRST_TRIAL + 3))
    assert counts[-3:] == [1, 1, 1]


def test_it_follows_a_machine_that_gets_busy_and_free_again():
    tuner, _ = make()
    machine = lambda step, n: busy(step, n) if 20 <= step < 60 else idle(step, n)  # noqa: E731
    counts, switches = simulate(tuner, machine, range(100))
    assert counts[FIRST_TRIAL:22] == [2] * (22 - FIRST_TRIAL)
    assert [(s.step, s.threads) for s in switches] == [(8, 2), (25, 1), (67, 2)]  # a slower window, a recheck
    trial = 1 + SETTINGS.window
    busy_part = counts[26:60]  # at one thread but for a trial of two every recheck_every steps
    assert busy_part.count(2) == trial * 2 and "2" * (trial + 1) not in "".join(map(str, busy_part))
    assert counts[68:] == [2] * 32


def test_one_slow_step_does_not_start_a_trial():
    tuner, _ = make()
    machine = lambda step, n: 5.0 if step == 30 else idle(step, n)  # noqa: E731
    counts, _ = simulate(tuner, machine, range(50))
    assert counts[FIRST_TRIAL:] == [2] * (50 - FIRST_TRIAL)


@pytest.mark.parametrize("stop", [4, FIRST_TRIAL - 1, 25, 33])
def test_a_resumed_tuner_runs_the_same_counts(stop):
    machine = lambda step, n: busy(step, n) if step >= 20 else idle(step, n)  # noqa: E731
    whole, _ = make()
    expected, _ = simulate(whole, machine, range(60))

    first, _ = make()
    before, _ = simulate(first, machine, range(stop))
    resumed, _ = make()
    assert resumed.load_state_dict(first.state_dict())
    after, _ = simulate(resumed, machine, range(stop, 60))
    assert before + after == expected


def test_a_state_made_for_other_counts_is_not_continued():
    other = ThreadTuner(8, 6, lambda n: None, SETTINGS)
    tuner, calls = make()
    assert not tuner.load_state_dict(other.state_dict())
    assert tuner.queue[0] == (2, False) and calls == [2]


def test_low_defaults_to_half_when_the_plan_leaves_every_cpu():
    tuner = ThreadTuner(4, 4, lambda n: None, SETTINGS)
    assert (tuner.high, tuner.low) == (4, 2)


def plan(intra_op: int | None = 1, cpus: int = 2, reason: str = "auto") -> ThreadPlan:
    return ThreadPlan(intra_op, cpus, 2, reason)


@pytest.mark.parametrize(
    ("kwargs", "plan_", "made"),
    [
        ({}, plan(), True),
        ({}, plan(4, 4, "requested"), False),  # --threads N / FOUNDATION_THREADS=N: the user's number stays
        ({}, plan(None, 2, "FOUNDATION_THREADS=off"), False),
        ({}, plan(1, 1), False),  # one CPU: nothing to choose
        ({"world_size": 2}, plan(), False),  # ranks share the CPUs by the plan
        ({"device_type": "cuda"}, plan(), False),
        # trials would cost more than they find
        ({"steps_left": TunerSettings().min_steps - 1}, plan(), False),
        # a resumed run continues its tuner however few steps are left: its uninterrupted twin kept tuning
        ({"steps_left": 5, "state": ThreadTuner(2, 1, lambda n: None).state_dict()}, plan(), True),
        ({"steps_left": 5, "state": ThreadTuner(8, 6, lambda n: None).state_dict()}, plan(), False),
    ],
)
def test_a_tuner_only_where_the_count_is_ours_to_choose(kwargs, plan_, made, monkeypatch):
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)
    args = {"steps_left": 100, "world_size": 1, "device_type": "cpu", **kwargs}
    steps_left = args.pop("steps_left")
    assert (tuner_for(plan_, steps_left, **args) is not None) == made
