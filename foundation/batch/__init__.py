"""Batch inference over many inputs: one runner for ``embed``, ``segment``, ``canopy-height`` (and later commands
over many inputs), MONAI's one-inferer idea applied to whole commands.

- :mod:`.status`: the exit-code rule (0 all done, 2 some skipped, 1 nothing done).
- :mod:`.launch`: ``--nproc N`` (re-run under torchrun) and the status a spawned batch ends with.
- :mod:`.report`: what happened to each item, merged over ranks, and the one ``summary.json`` format.
- :mod:`.runner`: items sharded by rank, a progress bar, skip-and-report, existing outputs counted as done.
- :mod:`.embedder`: the optional ``BatchEmbedder`` capability of a domain (``foundation embed`` per input).

Only the exit codes are imported here (every command uses them; the rest loads with the command that runs).
"""

from foundation.batch.status import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED, exit_status

__all__ = ["EXIT_DONE", "EXIT_NOTHING_DONE", "EXIT_SOME_SKIPPED", "exit_status"]
