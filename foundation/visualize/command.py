"""``foundation visualize``: backbone + inputs -> one PNG per input in a new output folder (and ``summary.json``).

Two passes: every input goes through the backbone first (the PCA is fitted over all of them), then each
picture is drawn. The folder is built under a temporary name and renamed when complete (an earlier output of
ours is replaced only with ``--overwrite``; inputs and foreign folders never), so a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from foundation.domain import get_domain
from foundation.errors import ConfigError, DataError
from foundation.export import load_backbone, resolve_backbone_source
from foundation.outputs import building_dir, check_output_dir
from foundation.train.distributed import resolve_device
from foundation.visualize.inputs import VisualRequest
from foundation.visualize.pipeline import fit, picture, see

log = logging.getLogger(__name__)

KIND = "visualize"


def _ints(text: str | None, flag: str, count: int | None = None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise ConfigError(f"{flag}={text!r}: expected comma-separated integers") from e
    if count is not None and len(values) != count:
        raise ConfigError(f"{flag}={text!r}: expected {count} comma-separated integers")
    return values


def build_request(args: argparse.Namespace, backbone_args: dict[str, Any]) -> VisualRequest:
    """The typed request from the command line and the backbone.

    Raises:
        ConfigError: a size that is not a whole number of patches, or a malformed list.
    """
    patch = int(backbone_args["patch_size"])
    size = int(args.img_size or backbone_args["img_size"])
    if size < patch or size % patch:
        raise ConfigError(f"--img-size={size} must be a positive multiple of the patch size {patch}")
    region = _ints(args.region, "--region", 4)
    if region is not None and (region[2] <= 0 or region[3] <= 0):
        raise ConfigError(f"--region={args.region!r}: width and height must be > 0")
    if args.mpp is not None and args.mpp <= 0:
        raise ConfigError(f"--mpp={args.mpp!r} must be > 0")
    if args.max_tiles < 1:
        raise ConfigError(f"--max-tiles={args.max_tiles!r} must be >= 1")
    return VisualRequest(
        inputs=tuple(args.inputs) + ((args.slide,) if getattr(args, "slide", None) else ()),
        size=size,
        patch_size=patch,
        spatial_dims=int(backbone_args.get("spatial_dims", 2)),
        channels=int(backbone_args["in_chans"]),
        region=region,  # type: ignore[arg-type]
        mpp=args.mpp,
        bands=_ints(args.bands, "--bands"),
        rgb=_ints(args.rgb, "--rgb", 3),  # type: ignore[arg-type]
        max_tiles=args.max_tiles,
        options=_options(getattr(args, "option", None) or []),
    )


def _options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items -> a dict, values parsed as YAML (numbers, lists, strings).

    Raises:
        ConfigError: an item without ``=``, or a key given twice.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. modality=mr")
        if key.strip() in out:
            raise ConfigError(f"--option {key.strip()!r} given twice")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--option {item!r}: the value is not valid YAML ({e})") from e
    return out


def _unique(name: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"
    stem, k = name, 2
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    taken.add(name)
    return name


def visualize(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command; returns its JSON summary.

    Raises:
        ConfigError: a domain without visualize inputs, bad options. DataError: an input that does not fit the
        backbone (channels, smaller than a patch) or none at all. OutputError: ``--out`` may not be written.
    """
    domain = get_domain(args.domain)
    source = getattr(domain, "visual_inputs", None)
    if source is None:
        raise ConfigError(f"the {args.domain!r} domain does not provide visualize inputs (visual_inputs)")
    backbone, meta = load_backbone(args.backbone)
    request = build_request(args, meta["backbone_args"])
    if not request.inputs:
        raise ConfigError("no input given: name images, slides, rasters or volumes (or --slide)")
    out = Path(args.out)
    given = [Path(p) for p in request.inputs] + [Path(meta["source"]), Path(args.backbone)]
    check_output_dir(out, KIND, overwrite=args.overwrite, inputs=given)
    device = resolve_device(args.device)
    backbone = backbone.eval().to(device)
    mean, std = meta.get("mean"), meta.get("std")
    seen = see(backbone, source(request), mean=mean, std=std, device=device, progress=not args.quiet)
    if not seen:
        raise DataError(f"nothing to visualize in {', '.join(request.inputs)}")
    pca = fit(seen, keep_background=args.keep_background)
    taken: set[str] = set()
    pictures = []
    with building_dir(out, KIND, overwrite=args.overwrite) as tmp:
        for s, rgb in zip(tqdm(seen, desc="pictures", unit="png", disable=args.quiet), pca.rgb, strict=True):
            name = _unique(s.item.name, taken) + ".png"
            (tmp / name).write_bytes(picture(s, rgb, pca))
            pictures.append({"input": s.item.title, "png": name, "grid": list(s.maps.grid)})
        summary = {
            "backbone": str(resolve_backbone_source(args.backbone)),
            "domain": args.domain,
            "normalisation": "backbone" if mean and std else "domain default",
            "background_removed": pca.background_removed,
            "pictures": pictures,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("%d picture(s) in %s", len(pictures), out)
    return {"out": str(out), **summary}
