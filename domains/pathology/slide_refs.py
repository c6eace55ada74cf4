"""The slides of a list file: entries read on demand (:class:`foundation.data.listing.ListFile`), each a local
``Path`` (a file, or a DICOM folder) or a URL string, so 100,000 slides cost an offset array, not 100,000 paths."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from foundation.data.listing import ListFile, is_url, url_key, url_name

SlideRef = Path | str  # a local slide, or a URL (kept a string: Path() would fold "https://" to "https:/")

# what a slide file (or a DICOM file of a slide folder) may be called
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".tif",
    ".tiff",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
)


def slide_ref(entry: str) -> SlideRef:
    """A list entry as the slide readers take it."""
    return entry if is_url(entry) else Path(entry)


def slide_name(slide: SlideRef) -> str:
    """The file (or DICOM folder) name of a slide, for outputs and progress bars; a URL's last path part."""
    return url_name(slide) if isinstance(slide, str) and is_url(slide) else Path(slide).name


def slide_key_text(slide: SlideRef) -> str:
    """The slide as outputs know it: an http(s) URL without its query (a signed URL's signature and expiry
    change each time it is made, the slide does not), anything else as it is."""
    return url_key(slide) if isinstance(slide, str) else str(slide)


class SlideList(Sequence[SlideRef]):
    """``slides[i]`` of a list file, read from it when asked for (see :class:`ListFile`)."""

    def __init__(self, entries: ListFile) -> None:
        self.entries = entries

    @property
    def path(self) -> Path:
        return self.entries.path

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> SlideRef:  # type: ignore[override]
        return slide_ref(self.entries[index])

    def __iter__(self) -> Iterator[SlideRef]:
        for entry in self.entries:
            yield slide_ref(entry)

    def __repr__(self) -> str:
        return f"SlideList({str(self.path)!r}, {len(self)} slides)"
