"""Pictures with matplotlib's Agg renderer and no pyplot: figures are plain ``Figure`` objects, so nothing
touches matplotlib's global backend or state (safe in tests, threads and headless servers)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from foundation.errors import MissingDependencyError, OutputError
from foundation.outputs import check_not_input, write_verified

PNG_SOFTWARE = "foundation"  # the PNG text chunk that marks a picture as ours


def new_figure(width: float, height: float, dpi: int = 100):
    """A ``matplotlib.figure.Figure`` (Agg canvas) of ``width x height`` inches.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError("pictures need matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def png_bytes(fig, title: str = "") -> bytes:
    """The figure as PNG bytes, marked as ours (``Software`` text chunk) with its title."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": PNG_SOFTWARE, "Title": title})
    return buf.getvalue()


def is_our_png(path: Path) -> bool:
    """A PNG this project wrote (its ``Software`` text chunk): the only kind a plot may replace."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def check_png_target(path: Path, inputs: Iterable[Path] = (), flag: str = "plot") -> None:
    """Refuse, before any work, a plot path that is an input or an existing file that is not our PNG.

    Raises:
        OutputError: naming the path; nothing was changed.
    """
    check_not_input(path, inputs, flag=flag)
    if path.is_dir() or (path.exists() and not is_our_png(path)):
        raise OutputError(
            f"{path} exists and is not a plot of ours; it was left alone (move it or choose another --out)"
        )


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def write_png(path: Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write PNG bytes atomically (temporary name, read back, rename)."""
    return write_verified(Path(path), lambda tmp: tmp.write_bytes(data), _check_png, overwrite=overwrite)
