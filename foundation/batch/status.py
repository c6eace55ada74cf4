"""One exit-code rule for every command over many inputs (embed, segment, canopy-height, pathology-qc, stats,
task evaluation): 0 every input done, 2 some inputs skipped (the rest finished), 1 nothing done."""

from __future__ import annotations

EXIT_DONE = 0
EXIT_NOTHING_DONE = 1
EXIT_SOME_SKIPPED = 2


def exit_status(done: int, skipped: int) -> int:
    """``done`` counts inputs finished now or found complete from an earlier run; ``skipped`` the failed ones."""
    if skipped == 0 and done > 0:
        return EXIT_DONE
    return EXIT_SOME_SKIPPED if done > 0 else EXIT_NOTHING_DONE
