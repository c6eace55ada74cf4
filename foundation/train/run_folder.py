"""What may train in a folder: a new or empty one, or a run of ours of the same kind (same command, domain, task
and objective), checked before anything in it is touched. A run folder is marked (``.foundation.json``, kind
``run``) so a folder of a user's files is never taken for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundation.errors import CheckpointError, OutputError
from foundation.outputs import check_writable, read_marker, write_marker
from foundation.train import checkpoint as ckpt

RUN_KIND = "run"


def run_identity(
    command: str, domain: str, *, task: str | None = None, ssl_method: str | None = None
) -> dict:
    """What a run is, for the resume check: another value for any of these is another run."""
    return {"command": command, "domain": domain, "task": task, "ssl_method": ssl_method}


def checkpoint_identity(state: dict[str, Any]) -> dict:
    """The identity of the run that wrote a checkpoint (checkpoints of every version carry these fields)."""
    task = state.get("task")
    method = None if task else state.get("config", {}).get("ssl", {}).get("method")
    return run_identity("finetune" if task else "pretrain", state.get("domain"), task=task, ssl_method=method)


def check_run_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot hold a run: a file, a missing parent, a non-empty folder that is neither
    marked as a run of ours nor holds checkpoints of ours (a folder of a user's files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} exists and is not a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputError(f"the parent folder of --out {str(out)!r} does not exist; create it first")
        check_writable(out.parent)
        return
    if not any(out.iterdir()):
        return
    marker = read_marker(out)
    if marker is not None and marker.get("kind") != RUN_KIND:
        raise OutputError(
            f"--out {str(out)!r} is a {marker.get('kind')} of ours, not a run folder; give another"
        )
    if marker is None and not ckpt.list_checkpoints(out):
        raise OutputError(
            f"--out {str(out)!r} is a folder of other files, not a run folder; nothing was changed. "
            "Give a new or empty folder"
        )


def refuse_other_run(out: Path, identity: dict, state: dict[str, Any] | None, path: Path | None) -> None:
    """Resuming continues the same run only: refuse (naming each difference) a checkpoint of another command,
    domain, task or objective."""
    if state is None:
        return
    found = checkpoint_identity(state)
    diffs = [
        f"{k}: {found[k]!r} in the run, {identity[k]!r} now" for k in identity if found.get(k) != identity[k]
    ]
    if diffs:
        raise CheckpointError(
            f"--out {str(out)!r} holds another run ({path.name}: {'; '.join(diffs)}); nothing was changed. "
            "Give another --out, or the run's own command and config to resume it"
        )


def refuse_other_backbone(state: dict[str, Any] | None, path: Path | None, backbone_args: dict) -> None:
    if state is not None and state.get("backbone_args") != backbone_args:
        raise CheckpointError(
            f"{path} was written for backbone {state.get('backbone_args')}, this config builds {backbone_args}; "
            "nothing was changed. Use another --out or the original config"
        )


def mark_run(out: Path, identity: dict) -> None:
    write_marker(out, RUN_KIND, files=[], **identity)
