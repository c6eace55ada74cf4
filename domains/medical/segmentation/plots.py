"""Pictures of an organ-segmentation evaluation: per-organ Dice as a bar chart, and per case the middle slice
of its organs (axial, radiological orientation) with the ground truth and the prediction drawn over it.

Only one 2D slice per case is kept while the volumes are scored, so any number of cases fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from foundation.outputs import building_dir, check_output_dir
from foundation.plotting import new_figure, png_bytes
from foundation_domains.medical.segmentation.meta import SegmentationMeta

KIND = "organ-segmentation-plots"


@dataclass(frozen=True)
class CaseSlice:
    """One case's axial slice ``z`` of ``depth``: intensities in [0, 1], label and prediction maps, and the
    case's own Dice per organ (organs in neither map left out)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    z: int
    depth: int
    dice: dict[str, float]


def _axial(volume: torch.Tensor, z: int) -> np.ndarray:
    """``X x Y x Z`` (RAS) -> slice ``z`` as ``H x W``: anterior at the top, the patient's right on the left."""
    return volume[..., z].T.flip(0, 1).cpu().numpy()


def case_slice(
    name: str, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, names: dict[int, str]
) -> CaseSlice:
    """The slice through the middle of the ground-truth organs (of the volume when it has none).

    ``image`` ``C x X x Y x Z``, ``label`` ``(1 x) X x Y x Z``, ``pred`` ``X x Y x Z`` class indices.
    """
    label = label.reshape(pred.shape).long()
    pred = pred.long()
    zs = torch.nonzero(label.sum(dim=(0, 1)) > 0).flatten()
    z = int(zs[len(zs) // 2]) if len(zs) else pred.shape[-1] // 2
    dice = {}
    for c, organ in sorted(names.items()):
        if c == 0:
            continue
        t, p = label == c, pred == c
        total = int(t.sum() + p.sum())
        if total:
            dice[organ] = float(2 * (t & p).sum() / total)
    return CaseSlice(
        name,
        _axial(image[0].float().clamp(0, 1), z),
        _axial(label, z),
        _axial(pred, z),
        z,
        pred.shape[-1],
        dice,
    )


def _colours(num_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    table = colormaps["tab10"](np.arange(max(num_classes, 1)) % 10)
    table[0, 3] = 0.0  # background: transparent
    return table


def dice_chart(scores: dict[str, float], cases: list[CaseSlice], title: str) -> bytes:
    """Per-organ Dice over all cases (bars, values written) with each case's own Dice as dots."""
    organs = [k.split("/", 1)[1] for k in scores if k.startswith("dice/")]
    values = [scores[f"dice/{o}"] for o in organs]
    fig = new_figure(max(4.5, 0.9 * len(organs) + 1.5), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(organs))
    bars = ax.bar(x, values, color="#6a9fd4", label="all cases")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for k, case in enumerate(cases):
        dots = [(i, case.dice[o]) for i, o in enumerate(organs) if o in case.dice]
        if dots:
            xs, ys = zip(*dots, strict=True)
            ax.scatter(
                np.array(xs) + 0.25, ys, s=10, color="#333", label="per case" if k == 0 else None, zorder=3
            )
    if "dice_mean" in scores:
        ax.axhline(scores["dice_mean"], color="#c33", linestyle="--", linewidth=0.9,
                   label=f"mean {scores['dice_mean']:.3f}")  # fmt: skip
    ax.set_xticks(x, organs, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig, f"{title}: per-organ Dice")


def overlay(case: CaseSlice, names: dict[int, str], num_classes: int) -> bytes:
    """Image, ground truth over it, prediction over it (same colour per organ, legend of the organs present)."""
    from matplotlib.patches import Patch

    colours = _colours(num_classes)
    fig = new_figure(9.0, 3.6)
    panels = (("image", None), ("ground truth", case.label), ("prediction", case.pred))
    for k, (title, labels) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if labels is not None:
            rgba = colours[np.clip(labels, 0, num_classes - 1)].copy()
            rgba[..., 3] *= 0.55
            ax.imshow(rgba, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    present = sorted(set(np.unique(case.label)) | set(np.unique(case.pred)) - {0})
    present = [int(c) for c in present if int(c) != 0]
    handles = [Patch(color=colours[c][:3], label=names.get(c, f"class {c}")) for c in present]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=7)
    dice = ", ".join(f"{o} {d:.2f}" for o, d in case.dice.items())
    fig.suptitle(f"{case.name}: axial slice {case.z + 1} of {case.depth}\nDice {dice}", fontsize=8)
    return png_bytes(fig, f"{case.name} overlay")


def check_plots_folder(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, a ``--plots`` folder we may not write (see :func:`check_output_dir`)."""
    check_output_dir(folder, KIND, overwrite=overwrite, inputs=inputs, flag="--plots")


def write_plots(
    folder: Path, scores: dict[str, float], cases: list[CaseSlice], meta: SegmentationMeta, *, overwrite: bool
) -> list[str]:
    """``dice.png`` and ``<case>_overlay.png`` per case in ``folder`` (built aside, then renamed)."""
    names = meta.class_names()
    written = []
    with building_dir(folder, KIND, overwrite=overwrite) as tmp:
        (tmp / "dice.png").write_bytes(dice_chart(scores, cases, "organ segmentation"))
        written.append("dice.png")
        taken: set[str] = set()
        for case in cases:
            name, k = f"{case.name}_overlay.png", 2
            while name in taken:
                name, k = f"{case.name}_{k}_overlay.png", k + 1
            taken.add(name)
            (tmp / name).write_bytes(overlay(case, names, meta.num_classes))
            written.append(name)
    return [str(folder / n) for n in written]
