"""Rank 0's view of a run: a progress bar, ``metrics.jsonl`` and TensorBoard events."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def read_records(path: Path) -> list[tuple[str, dict]]:
    """The readable lines of ``metrics.jsonl``; a line cut by a kill during a write is dropped with a warning."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s line %d is not a whole JSON record (a write cut short); dropped", path, number)
            continue
        records.append((line, record))
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (they were written before a crash and will be replayed)."""
    if not path.is_file():
        return
    kept = [line for line, record in read_records(path) if record.get("step", -1) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int, quiet: bool
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step - 1)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step)
        except ImportError:  # tensorboard is a dependency, but keep training if a user removed it
            log.warning("tensorboard is not installed; only metrics.jsonl is written")
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=quiet,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
        }
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def image(self, step: int, tag: str, png: bytes) -> None:
        """A picture (PNG bytes) to TensorBoard under ``images/<tag>``."""
        if self._tb is None:
            return
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            self._tb.add_image(f"images/{tag}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def progress(self, n: int, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
