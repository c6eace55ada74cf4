"""The name of each slide's feature file, shared by ``embed`` (which writes them), region files, slide lists,
QC and heatmaps (which find a slide by that name)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from foundation.data.listing import is_url
from foundation_domains.pathology.slide_refs import SLIDE_SUFFIXES, SlideRef, slide_key_text, slide_name


def output_names(slides: Sequence[SlideRef], root: Path) -> list[str]:
    """``<stem>.h5`` per slide (a DICOM folder keeps its whole name: UIDs are full of dots; a URL gives its file's
    stem). Stems that repeat get their folders joined by ``__`` (``x__s.h5``); names that still repeat (``a.svs``
    next to ``a.tif``) keep their suffix too (``x__a.svs.h5``). In a list file, whose slides share no folder, a
    stem that repeats gets a short hash of its entry (``s__1f2e3d4c.h5``)."""

    def relative(path: Path, keep_suffix: bool) -> str:
        rel = path.relative_to(root)
        last = rel.name if keep_suffix or path.is_dir() else rel.stem
        return "__".join((*rel.parent.parts, last))

    def own(slide: SlideRef) -> str:
        name = slide_name(slide)
        suffix = Path(name).suffix.lower()
        # a DICOM slide is a folder; a stat only when the name does not say it is a file
        folder = suffix not in SLIDE_SUFFIXES and not is_url(slide) and Path(slide).is_dir()
        return name if folder else Path(name).stem

    names = [own(p) for p in slides]
    if root.is_dir():
        for keep_suffix in (False, True):
            counts = Counter(names)  # not names.count: quadratic, seconds for 10,000 slides
            names = [
                relative(p, keep_suffix) if counts[n] > 1 else n for p, n in zip(slides, names, strict=True)
            ]
    else:
        counts = Counter(names)
        base = root.resolve().parent  # a list file's folder: entries below it are hashed relative to it

        def entry(slide: SlideRef) -> str:
            """What tells the slide apart, the same after the folder of the list and its slides moved."""
            if is_url(slide):
                return slide_key_text(slide)
            path = Path(slide)
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)

        names = [
            f"{n}__{hashlib.sha1(entry(p).encode()).hexdigest()[:8]}" if counts[n] > 1 else n
            for p, n in zip(slides, names, strict=True)
        ]
    return [f"{n}.h5" for n in names]
