"""The training loop's intra-op thread count, chosen from measured step times.

No fixed count is right on a small shared machine. On 2 idle cores a tiny model's step takes ~0.6x as long with
two threads as with one; beside one busy process the same two threads wait at every parallel region for the one
the OS has parked, and the step takes longer than with one thread. So the loop measures instead of guessing: it
times a few steps at every CPU it may use (``high``) and a few at the count that leaves its loader workers a core
(``low``), keeps the faster, and measures again when a window of steps gets slower than the best seen at that
count (another process started) or, while at ``low``, every ``recheck_every`` steps (it may have finished).

The count changes a step's last bits (thread partial sums are added in another order), never more. Trials are
laid out by step index, so on a machine whose speed does not change two runs, or a run and its resumption, take
the same counts at the same steps; :meth:`ThreadTuner.state_dict` goes into the checkpoint for that.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from foundation.threads import ThreadPlan


@dataclass(frozen=True)
class TunerSettings:
    warmup: int = 2  # untimed steps at the start: loader workers starting, first allocations
    window: int = 3  # timed steps per trial; a median of three ignores one slow step
    recheck_every: int = 50  # steps at ``low`` between trials of ``high``
    slower: float = 1.3  # a window this much slower than the count's best starts a trial of the other count
    # ``high`` must be this much faster to be kept: fewer threads are kinder to the machine's other processes
    prefer_low: float = 0.05
    min_steps: int = 20  # shorter runs keep the planned count: trials would cost more than they find


@dataclass(frozen=True)
class Switch:
    """A change of count after a trial, for the log."""

    step: int
    threads: int
    seconds: dict[int, float]  # median step seconds per count in the trial


class ThreadTuner:
    """Decides, after each training step, how many intra-op threads the next step runs.

    Args:
        high: every CPU this process may use.
        low: the planned count (CPUs less loader workers); ``high // 2`` when that equals ``high``.
        set_threads: applies a count (``torch.set_num_threads``).
    """

    def __init__(
        self,
        high: int,
        low: int,
        set_threads: Callable[[int], None],
        settings: TunerSettings | None = None,
    ) -> None:
        self.high, self.low = high, low = self.counts(high, low)
        self.settings = s = settings or TunerSettings()
        self._set = set_threads
        # the trial in progress: (count, timed) per remaining step; the first trial compares both counts
        self.queue: deque[tuple[int, bool]] = deque(
            [(high, False)] * s.warmup + [(high, True)] * s.window + [(low, False)] + [(low, True)] * s.window
        )
        self.samples: dict[int, list[float]] = {high: [], low: []}
        self.best: dict[int, float] = {}
        self.current = high
        self.recent: deque[float] = deque(maxlen=s.window)
        self.since_trial = 0
        self.decided = False
        self.applied: int | None = None
        self.apply()

    @staticmethod
    def counts(high: int, low: int) -> tuple[int, int]:
        """The two counts tried: ``low`` becomes half of ``high`` when the plan leaves every CPU."""
        return high, low if low < high else max(1, high // 2)

    @property
    def next_threads(self) -> int:
        return self.queue[0][0] if self.queue else self.current

    def apply(self) -> None:
        """Set the count the next step runs with (a no-op when it is already set)."""
        n = self.next_threads
        if n != self.applied:
            self._set(n)
            self.applied = n

    def observe(self, step: int, seconds: float) -> Switch | None:
        """Record the step just run (``seconds`` of wall time), set the next step's count; a :class:`Switch`
        when a trial ended on the other count than before."""
        s = self.settings
        switch = None
        if self.queue:
            count, timed = self.queue.popleft()
            if timed:
                self.samples[count].append(seconds)
            if not self.queue:
                switch = self._decide(step)
        else:
            self.recent.append(seconds)
            self.since_trial += 1
            if len(self.recent) == s.window:
                median = statistics.median(self.recent)
                self.best[self.current] = min(self.best.get(self.current, median), median)
                drifted = median > s.slower * self.best[self.current]
                due = self.current != self.high and self.since_trial >= s.recheck_every
                if drifted or due:
                    self._start_trial(median)
        self.apply()
        return switch

    def _start_trial(self, current_median: float) -> None:
        other = self.low if self.current == self.high else self.high
        self.samples = {self.current: [current_median], other: []}
        self.queue = deque([(other, False)] + [(other, True)] * self.settings.window)

    def _decide(self, step: int) -> Switch | None:
        medians = {n: statistics.median(v) for n, v in self.samples.items() if v}
        faster = medians[self.high] < (1 - self.settings.prefer_low) * medians[self.low]
        choice = self.high if faster else self.low
        for n, m in medians.items():
            self.best[n] = m if n == choice else min(self.best.get(n, m), m)
        before, self.current = self.current, choice
        self.recent.clear()
        self.since_trial = 0
        if choice == before and self.decided:
            return None
        self.decided = True
        return Switch(step, choice, {n: round(m, 4) for n, m in medians.items()})

    # -- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "high": self.high,
            "low": self.low,
            "current": self.current,
            "queue": [list(x) for x in self.queue],
            "samples": {str(k): list(v) for k, v in self.samples.items()},
            "best": {str(k): v for k, v in self.best.items()},
            "recent": list(self.recent),
            "since_trial": self.since_trial,
            "decided": self.decided,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue a saved tuner; False (and nothing changed) when it was made for other counts."""
        if (state.get("high"), state.get("low")) != (self.high, self.low):
            return False
        self.current = int(state["current"])
        self.queue = deque((int(n), bool(t)) for n, t in state["queue"])
        self.samples = {int(k): [float(x) for x in v] for k, v in state["samples"].items()}
        self.best = {int(k): float(v) for k, v in state["best"].items()}
        self.recent = deque((float(x) for x in state["recent"]), maxlen=self.settings.window)
        self.since_trial = int(state["since_trial"])
        self.decided = bool(state["decided"])
        self.apply()
        return True


def tuner_for(
    plan: ThreadPlan,
    steps_left: int,
    *,
    world_size: int,
    device_type: str,
    state: dict[str, Any] | None = None,
) -> ThreadTuner | None:
    """A tuner when the count is ours to choose: automatic sizing, a CPU run of one process, more than one CPU,
    and enough steps left for trials to pay off, or a resumed run's ``state`` to continue however few steps are
    left (its uninterrupted twin kept tuning); None keeps the planned count."""
    settings = TunerSettings()
    if plan.reason != "auto" or plan.intra_op is None or plan.cpus < 2:
        return None
    if world_size != 1 or device_type != "cpu":
        return None
    resumed = state is not None and (state.get("high"), state.get("low")) == ThreadTuner.counts(
        plan.cpus, plan.intra_op
    )
    if not resumed and steps_left < settings.min_steps:
        return None
    import torch

    tuner = ThreadTuner(plan.cpus, plan.intra_op, torch.set_num_threads, settings)
    if resumed:
        tuner.load_state_dict(state)
    return tuner
