"""``foundation segment``: NIfTI label maps of volumes (NIfTI files, DICOM series folders, or folders of them).

Each input ``NAME.nii.gz`` (or DICOM folder ``NAME``) gives ``OUT/NAME_seg.nii.gz`` on exactly the input's voxel
grid (:mod:`domains.medical.segmentation.infer`). Files are written under a temporary name and renamed once
complete; existing outputs are kept unless ``--overwrite``, so a rerun finishes an interrupted batch.
Under torchrun (or ``--nproc N``) volume ``i`` goes to rank ``i % world_size``. A broken input (not a volume,
unreadable, a DICOM folder mixing series or missing slices, a 4D image where 3D is expected) is skipped with
its reason; the others finish. ``OUT/summary.json`` (``summary_rank{r}.json`` per rank) lists what happened, and
if anything was skipped a :class:`DataError` follows, so the command exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SUFFIX = "_seg.nii.gz"
DESCRIPTION = """\
Each input NAME.nii.gz (or DICOM series folder NAME) gives OUT/NAME_seg.nii.gz with exactly the input's shape and
affine: preprocessing as in training (RAS, spacing, intensity preset), Gaussian sliding window, argmax, then
nearest-neighbour back onto the input grid. Outputs are written atomically; existing ones are kept unless
--overwrite, so a rerun finishes an interrupted batch. Broken inputs are skipped and listed in OUT/summary.json
(summary_rank{r}.json under torchrun), and the command then exits with status 2.
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
    p.add_argument("--overwrite", action="store_true", help="redo volumes whose output exists already")
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
    from domains.medical.dicom import is_dicom_file
    from domains.medical.volume import find_volumes

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


def write_atomic(img, path: Path) -> None:
    """``nib.save`` to a hidden temporary name in the same folder, fsync, rename: never a half-written file."""
    import nibabel as nib

    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(img, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_segment(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from foundation.cli import spawn_local

        return spawn_local(args.nproc, sys.argv[1:])
    result, skipped = segment_volumes(args)
    if result is not None:
        print(json.dumps(result))
    if skipped:
        raise DataError(
            f"{len(skipped)} input(s) skipped (see {args.out}/summary*.json); first: {skipped[0]['reason']}"
        )
    return 0


def segment_volumes(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """Segment every input (this rank's share under torchrun): ``(summary or None off rank 0, skipped inputs of
    all ranks)``; a broken input is skipped, not raised.

    Raises:
        DataError: no volume at all in the inputs.
        ConfigError / CheckpointError: bad flags, two inputs with one output name, or an unusable checkpoint.
    """
    from tqdm import tqdm

    from domains.medical.segmentation.infer import Segmenter
    from foundation.train.distributed import all_gather_objects, destroy_distributed, init_distributed

    out_dir = Path(args.out)
    if not out_dir.parent.exists():
        raise DataError(f"the parent folder of --out {str(out_dir)!r} does not exist")
    volumes, bad = list_inputs(list(args.inputs))
    volumes = [v for v in volumes if not v.is_relative_to(out_dir.resolve())]  # never our own outputs
    names = _check_names(volumes)
    if not volumes:
        raise DataError("no volumes to segment: " + "; ".join(b["reason"] for b in bad))
    out_dir.mkdir(exist_ok=True)

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
        written: list[dict[str, Any]] = []
        existing: list[dict[str, str]] = []
        skipped = [dict(b) for b in bad] if dist.is_main else []
        mine = [i for i in range(len(volumes)) if i % dist.world_size == dist.rank]
        bar = tqdm(mine, desc=f"segment (rank {dist.rank})", unit="volume", disable=args.quiet)
        for i in bar:
            path, out = volumes[i], out_dir / names[i]
            if out.exists() and not args.overwrite:
                existing.append({"input": str(path), "out": str(out)})
                continue
            try:
                img = segmenter.segment(path)
                write_atomic(img, out)
            except DataError as e:
                log.warning("skipping %s", e)
                skipped.append({"input": str(path), "reason": str(e)})
                continue
            written.append({"input": str(path), "out": str(out), "shape": list(img.shape)})
        summary_path = out_dir / (f"summary_rank{dist.rank}.json" if dist.world_size > 1 else "summary.json")
        _write_json(
            summary_path,
            {
                "rank": dist.rank,
                "world_size": dist.world_size,
                "written": written,
                "existing": existing,
                "skipped": skipped,
            },
        )
        parts = all_gather_objects((written, existing, skipped))
    finally:
        destroy_distributed()
    all_written = [w for p in parts for w in p[0]]
    all_existing = [w for p in parts for w in p[1]]
    all_skipped = [s for p in parts for s in p[2]]
    result = {
        "out": str(out_dir),
        "written": len(all_written),
        "existing": len(all_existing),
        "skipped": len(all_skipped),
        "outputs": [w["out"] for w in all_written],
        "skipped_inputs": all_skipped,
    }
    if dist.is_main:
        log.info("%d label map(s) written to %s, %d skipped", len(all_written), out_dir, len(all_skipped))
    return result if dist.is_main else None, all_skipped


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
