"""``foundation visualize`` inputs of the ``images`` domain: image files or folders of them, resized and
centre-cropped exactly as ``evaluate``/``embed`` do (:class:`EvalView`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from foundation.data.image_folder import IMAGE_SUFFIXES, ImageFolder, read_rgb
from foundation.data.views import EvalView
from foundation.errors import DataError
from foundation.visualize.inputs import VisualInput, VisualRequest


def image_files(inputs: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """``(file, root)`` for every image named or found in a named folder (sorted, recursive).

    Raises:
        DataError: a path that does not exist or is not an image file.
    """
    found = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found += [(f, path) for f in ImageFolder.scan(path).files]
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((path, path.parent))
        elif path.exists():
            raise DataError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise DataError(f"{path}: does not exist")
    return found


def visual_inputs(
    request: VisualRequest, mean: tuple[float, ...], std: tuple[float, ...]
) -> Iterator[VisualInput]:
    """RGB in [0, 1] at ``request.size`` (shorter side resized, centre crop), as the model is evaluated."""
    request.refuse("images", "region", "mpp", "bands", "rgb")
    view = EvalView(request.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for path, root in image_files(request.inputs):
        rgb = read_rgb(path)
        if min(rgb.shape[:2]) < request.patch_size:
            raise DataError(
                f"{path}: {rgb.shape[1]}x{rgb.shape[0]} pixels is smaller than one "
                f"{request.patch_size}-pixel patch; nothing to show"
            )
        name = "__".join(path.relative_to(root).with_suffix("").parts)
        yield VisualInput(name=name, title=str(path), pixels=view(rgb), mean=mean, std=std)
