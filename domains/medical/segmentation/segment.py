"""``foundation segment``: NIfTI label maps of volumes (NIfTI files, DICOM series folders, or folders of them).

Each input ``NAME.nii.gz`` (or DICOM folder ``NAME``) gives ``OUT/NAME_seg.nii.gz`` on exactly the input's
voxel grid (:mod:`foundation_domains.medical.segmentation.infer`). Files are written under a temporary name, re-opened
and checked, then renamed. Each label map carries its key (a NIfTI1 extension holding JSON: the input's
resolved path, size and mtime, the model's weights fingerprint and the inference settings): a map whose key
matches is done, so a rerun finishes an interrupted batch; one of ours with another key (another volume of
that name, a retrained model) is replaced only with ``--overwrite``, else the volume is skipped; a file of
that name that we did not write is never replaced. An ``OUT/summary.json`` that is not ours is refused before
any work. Under torchrun (or ``--nproc N``) volume ``i`` goes to rank ``i % world_size``. A broken input (not
a volume, unreadable, every voxel NaN, a DICOM folder mixing series or missing slices, a 4D image where 3D is
expected) or a label map that cannot be written (full disk) is skipped with its reason; the others finish. NaN
and infinite voxels are missing data: labelled background, their share reported. ``OUT/summary.json``
(the common batch summary of :mod:`foundation.batch.report`; under torchrun also ``summary_rank{r}.json`` per
rank) lists what happened; the exit status is
:func:`foundation.batch.exit_status` (0 all done, 2 some skipped, 1 none done).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from foundation.batch.launch import should_spawn, spawn_batch
from foundation.batch.report import EXISTING, SKIPPED, WRITTEN, BatchReport, ItemResult
from foundation.batch.runner import BatchOutcome, BatchSpec, Item, Steps, finish, run_items
from foundation.batch.summary import check_summaries
from foundation.errors import CheckpointError, ConfigError, DataError, OutputError
from foundation.outputs import check_not_input, check_writable, output_error, write_verified

log = logging.getLogger(__name__)
SUFFIX = "_seg.nii.gz"
LABEL_DESCRIPTION = b"foundation segment"  # the start of the NIfTI descrip of every label map written here
# A label map's key is JSON in a NIfTI1 extension of code 6 ("comment", free text): other readers skip it.
KEY_EXTENSION = "comment"
KEY_FIELD = "foundation_segment_key"
COMMAND = "segment"
LEGACY_SUMMARY_KEYS = {"rank", "world_size", "written", "existing", "skipped"}  # an older summary's
DESCRIPTION = """\
Each input NAME.nii.gz (or DICOM series folder NAME) gives OUT/NAME_seg.nii.gz with exactly the input's shape
and affine: preprocessing as in training (RAS, spacing, intensity preset), Gaussian sliding window, argmax,
then nearest-neighbour back onto the input grid. Outputs are written atomically and read back before they are
renamed into place. A label map already made from the same input file (path, size, mtime) with the same model
weights and settings is kept, so a rerun finishes an interrupted batch; one made from another input or model
is replaced only with --overwrite (else that volume is skipped); files not written by segment (label maps, a
summary.json) are never replaced. NaN and infinite voxels are missing data: left out of the intensity
normalisation and labelled background (their share is in the summary). Broken inputs (and volumes entirely
NaN) are skipped and listed in OUT/summary.json (also summary_rank{r}.json per rank under torchrun). Exit status: 0 every
volume done, 2 some skipped, 1 none done.
"""
EPILOG = """\
examples:
  foundation segment ct.nii.gz --checkpoint runs/organs --out seg/
  foundation segment scans/ dicom/series1 --checkpoint seg.pt --out seg/ --overwrite
  foundation segment scans/ --checkpoint seg.pt --out seg/ --nproc 4     # 4 local workers, volumes sharded
  torchrun --nproc-per-node 8 -m foundation segment scans/ --checkpoint seg.pt --out seg/
"""


def add_segment_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="organ label maps (NIfTI, input affine and shape) of volumes with a fine-tuned segmentation model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="VOLUME_OR_DIR", help="NIfTI files, DICOM series folders, or folders"
    )
    p.add_argument(
        "--checkpoint", required=True, help="organ-segmentation model: run folder, model.pt or checkpoint"
    )
    p.add_argument("--out", required=True, help="output folder (created; its parent must exist)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo volumes whose label map (written by segment) exists, even one from another input or model",
    )
    p.add_argument("--overlap", type=float, help="sliding-window overlap; default: the checkpoint's (0.5)")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass; default: the checkpoint's")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on CUDA, else fp32",
    )
    p.add_argument(
        "--stitch",
        default="auto",
        choices=["auto", "cpu", "device"],
        help="where logits are accumulated; auto: on the GPU when they fit in half its free memory, else CPU",
    )
    p.add_argument(
        "--nproc", type=int, default=0, help="spawn this many local workers (torchrun --standalone)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when available"
    )
    p.set_defaults(func=cmd_segment)


def output_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + SUFFIX
    return name + SUFFIX


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Volumes named by ``inputs`` and the inputs that give none: ``(volumes, [{input, reason}])``.

    A file is taken as given (checked when read); a folder holding DICOM files is one series; any other
    folder is searched recursively for NIfTI files and DICOM series.
    """
    from foundation_domains.medical.dicom import is_dicom_file
    from foundation_domains.medical.volume import find_volumes

    volumes: list[Path] = []
    bad: list[dict[str, str]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            bad.append({"input": str(path), "reason": f"{path}: no such file or folder"})
        elif path.is_file() or any(f.is_file() and is_dicom_file(f) for f in path.iterdir()):
            volumes.append(path)
        else:
            try:
                volumes += find_volumes(path)
            except DataError as e:
                bad.append({"input": str(path), "reason": str(e)})
    unique = list(dict.fromkeys(p.resolve() for p in volumes))
    return unique, bad


def _check_names(volumes: list[Path]) -> list[str]:
    names = [output_name(v) for v in volumes]
    seen: dict[str, Path] = {}
    for name, v in zip(names, volumes, strict=True):
        if name in seen:
            raise ConfigError(
                f"{seen[name]} and {v} would both be written as {name}; segment them into different --out folders"
            )
        seen[name] = v
    return names


def is_our_label_map(path: Path) -> bool:
    """``path`` is a label map ``foundation segment`` wrote (its NIfTI description says so)."""
    import nibabel as nib

    try:
        return bytes(nib.load(path).header["descrip"]).startswith(LABEL_DESCRIPTION)
    except Exception:  # not a NIfTI file, unreadable: not ours
        return False


def input_key(path: Path) -> dict[str, Any]:
    """What identifies an input: its resolved path, size and mtime (a DICOM folder: its files' total size and
    newest mtime), so another volume of the same name, or an edited one, is not taken as done.

    Raises:
        DataError: the input cannot be examined.
    """
    path = path.resolve()
    try:
        files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
        stats = [f.stat() for f in files] or [path.stat()]
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e
    size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
    return {"path": str(path), "size": size, "mtime_ns": mtime}


def volume_key(segmenter, path: Path) -> dict[str, Any]:
    """The key of the label map of ``path`` made by ``segmenter``: which input, which model and settings."""
    return {"input": input_key(path), "model": segmenter.settings_key()}


def stamp_key(img, key: dict[str, Any]) -> None:
    """Store ``key`` in ``img``'s header as a NIfTI1 extension (replacing one of ours already there)."""
    from nibabel.nifti1 import Nifti1Extension

    extensions = img.header.extensions
    extensions[:] = [e for e in extensions if _key_in(e) is None]
    extensions.append(Nifti1Extension(KEY_EXTENSION, json.dumps({KEY_FIELD: key}, sort_keys=True).encode()))


def _key_in(extension) -> dict[str, Any] | None:
    try:
        content = json.loads(extension.get_content())
    except (ValueError, UnicodeDecodeError, TypeError):
        return None
    return content.get(KEY_FIELD) if isinstance(content, dict) else None


def _stored_key(header) -> dict[str, Any] | None:
    return next((k for k in map(_key_in, header.extensions) if k is not None), None)


def label_map_key(path: Path) -> dict[str, Any] | None:
    """The key stored in the label map at ``path``; None if it has none (not ours, unreadable, or written before
    keys were stored)."""
    import nibabel as nib

    try:
        return _stored_key(nib.load(path).header)
    except Exception:  # not a NIfTI file, unreadable: no key
        return None


def prior_output(out: Path, key: dict[str, Any], overwrite: bool) -> tuple[str, str | None]:
    """What an existing ``out`` means for its volume: ``("write", None)``, ``("done", None)`` (ours, made from
    this input with this model and settings) or ``("skip", reason)``."""
    if not out.exists():
        return "write", None
    if not is_our_label_map(out):
        return "skip", f"{out} exists and is not a label map of foundation segment; it was left alone"
    if overwrite:
        return "write", None
    if label_map_key(out) == key:
        return "done", None
    return "skip", f"{out} was made from another input or model; pass --overwrite to replace it"


def write_label_map(img, path: Path) -> None:
    """Write ``img`` to ``path`` through a temporary name, re-open it and check shape, affine, dtype, every
    voxel and the stored key before the rename.

    Raises:
        OutputError: naming ``path`` and the reason ("no space left on device" for a full disk); no temporary
            file is left behind and an older ``path`` is untouched.
    """
    import nibabel as nib
    import numpy as np

    labels = np.asarray(img.dataobj)
    key = _stored_key(img.header)

    def verify(tmp: Path) -> None:
        back = nib.load(tmp)
        same = back.shape == img.shape and back.get_data_dtype() == labels.dtype
        if not (same and np.allclose(back.affine, img.affine, atol=1e-5)):
            raise OutputError(f"{path}: the file written does not read back with the label map's grid")
        if not np.array_equal(np.asarray(back.dataobj), labels):
            raise OutputError(f"{path}: the file written does not read back with the labels written")
        if label_map_key(tmp) != key:
            raise OutputError(f"{path}: the file written does not read back with its key")

    write_verified(path, lambda tmp: nib.save(img, tmp), verify)


def check_out(out_dir: Path, inputs: list[str], checkpoint: str) -> None:
    """Refuse, before any work, an ``--out`` that is a file, an input or the checkpoint, holds one of them, or
    cannot be written.

    Raises:
        OutputError: naming ``--out`` and the problem.
    """
    check_not_input(out_dir, [Path(i) for i in inputs] + checkpoint_paths(checkpoint))
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(
            f"--out {str(out_dir)!r} exists and is not a folder; give a folder for the label maps"
        )
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise OutputError(f"the parent folder of --out {str(out_dir)!r} does not exist; create it first")
    check_writable(out_dir if out_dir.exists() else out_dir.parent, "--out")


def _legacy_summary(data: dict[str, Any]) -> bool:
    """A summary written by segment before the common batch summary: a JSON object with exactly these keys."""
    return set(data) == LEGACY_SUMMARY_KEYS


def checkpoint_paths(checkpoint: str | Path) -> list[Path]:
    """``checkpoint`` and the file it resolves to (a run folder's model), which ``--out`` must not hold either;
    a checkpoint that does not resolve is reported when it is loaded."""
    from foundation.tasks.checkpoint import resolve_task_checkpoint

    paths = [Path(checkpoint)]
    with contextlib.suppress(CheckpointError):
        paths.append(resolve_task_checkpoint(checkpoint))
    return paths


def cmd_segment(args: argparse.Namespace) -> int:
    if should_spawn(args.nproc):
        check_out(Path(args.out), list(args.inputs), args.checkpoint)  # one error, not one per worker
        check_summaries(Path(args.out), COMMAND, _legacy_summary)
        return spawn_batch(args.nproc, sys.argv[1:])
    result, outcome = segment_volumes(args)
    if outcome.is_main:
        print(json.dumps(result))
    outcome.raise_error()
    return outcome.exit_code()


def segment_volumes(args: argparse.Namespace) -> tuple[dict[str, Any], BatchOutcome]:
    """Segment every input (this rank's share under torchrun) on :mod:`foundation.batch.runner`: the printed
    result (every rank's) and the batch's outcome; a broken input is skipped, not raised.

    Raises:
        OutputError: ``--out`` is a file, an input, not writable, or holds a ``summary*.json`` that is not ours.
        DataError: no volume at all in the inputs.
        ConfigError / CheckpointError: bad flags, two inputs with one output name, or an unusable checkpoint.
    """
    from foundation.train.distributed import destroy_distributed, init_distributed
    from foundation_domains.medical.segmentation.infer import Segmenter

    out_dir = Path(args.out)
    check_out(out_dir, list(args.inputs), args.checkpoint)
    check_summaries(out_dir, COMMAND, _legacy_summary)
    volumes, bad = list_inputs(list(args.inputs))
    volumes = [v for v in volumes if not v.is_relative_to(out_dir.resolve())]  # never our own outputs
    names = _check_names(volumes)
    if not volumes:
        raise DataError("no volumes to segment: " + "; ".join(b["reason"] for b in bad))

    dist = init_distributed(args.device)
    try:
        segmenter = Segmenter.from_checkpoint(
            args.checkpoint,
            dist.device,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            precision=args.precision,
            stitch=args.stitch,
        )
        _make_folder(out_dir)  # only now: a bad checkpoint leaves nothing behind
        report = BatchReport(ranks=(dist.rank,))
        if dist.is_main:  # inputs that name no volume: reported once
            for b in bad:
                log.warning("skipping %s: %s", b["input"], b["reason"])
                report.results.append(ItemResult(b["input"], SKIPPED, reason=b["reason"], facts=dict(b)))
        spec = BatchSpec(
            COMMAND, "input", progress=not args.quiet, entry_keys=lambda item: {"input": item.name}
        )
        keys: dict[int, dict[str, Any]] = {}  # an input's key, examined once: checked, then stamped
        steps: Steps[Path, Item[Path]] = Steps(
            run=lambda item, _: _segment_one(segmenter, item.source, item.out, keys.pop(item.index)),
            existing=lambda item: _existing(segmenter, item, args.overwrite, keys),
        )
        items = [Item(i, str(v), v, out_dir / n) for i, (v, n) in enumerate(zip(volumes, names, strict=True))]
        run_items(items, steps, spec, rank=dist.rank, world_size=dist.world_size, report=report)
        outcome = finish(
            report, spec, rank=dist.rank, world_size=dist.world_size, summary_dir=out_dir, out=str(out_dir)
        )
    finally:
        destroy_distributed()
    merged = outcome.report
    written = [{"input": r.item, "out": r.out, **r.facts} for r in merged.of(WRITTEN)]
    result = {
        "out": str(out_dir),
        "done": merged.done,
        "written": len(written),
        "existing": len(merged.of(EXISTING)),
        "skipped": len(merged.skipped),
        "outputs": [w["out"] for w in written],
        "volumes": written,
        "skipped_inputs": [{"input": r.item, "reason": r.reason} for r in merged.skipped],
    }
    if dist.is_main:
        log.info("%d label map(s) written to %s, %d skipped", len(written), out_dir, len(merged.skipped))
    return result, outcome


def _existing(
    segmenter, item: Item[Path], overwrite: bool, keys: dict[int, dict[str, Any]]
) -> dict[str, Any] | None:
    """The runner's ``existing`` step (:func:`prior_output`): ``{}`` for a label map of ours already made from
    this input with this model, None to (re)make it (its key kept in ``keys`` for the map to carry).

    Raises:
        DataError: the input cannot be examined, or the file there is not ours (never replaced) or was made
            otherwise and ``overwrite`` is off.
    """
    assert item.out is not None
    key = volume_key(segmenter, item.source)
    action, reason = prior_output(item.out, key, overwrite)
    if action == "skip":
        raise DataError(str(reason))
    if action == "done":
        return {}
    keys[item.index] = key
    return None


def _segment_one(segmenter, path: Path, out: Path, key: dict[str, Any]) -> dict[str, Any]:
    """Segment ``path`` into ``out`` stamped with ``key``; the summary entry, with warnings for missing voxels and
    for an all-background map of a volume that is not all background."""
    seg = segmenter.run(path)
    stamp_key(seg.image, key)
    write_label_map(seg.image, out)
    entry = {
        "input": str(path),
        "out": str(out),
        "shape": list(seg.image.shape),
        "nonfinite_fraction": round(seg.nonfinite_fraction, 6),
        "foreground_fraction": round(seg.foreground_fraction, 6),
    }
    if seg.nonfinite_fraction > 0:
        log.warning(
            "%s: %.1f%% of the voxels are NaN or infinite; treated as missing and labelled background",
            path, 100 * seg.nonfinite_fraction,
        )  # fmt: skip
    if seg.foreground_fraction == 0 and seg.has_signal:
        log.warning(
            "%s: the label map is all background although the volume is not; check the model and that the "
            "volume is what it was trained on (modality, intensities)",
            path,
        )
    return entry


def _make_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise output_error(e, out_dir, "cannot create the folder") from e
