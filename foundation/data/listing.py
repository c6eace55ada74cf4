"""Data given as a list file: a ``.txt`` (one path or URL per line) or a ``.csv`` (a ``path``/``url``/``slide``
column), read without holding its entries in memory.

The file is streamed once to record each entry's byte offset (an int64 array: 0.8 MB for 100,000 entries) and
its line number; ``entries[i]`` seeks to line ``i`` and parses it. So a sampler can draw any index of a huge
archive, and count it, without 100,000 path objects per worker. Relative paths resolve against the list file's
folder; URLs (``https://``, ``s3://``, ...) are kept as they are.
"""

from __future__ import annotations

import csv
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError

LIST_SUFFIXES = (".txt", ".csv")
CSV_COLUMNS = ("path", "url", "slide")  # the first of these a CSV has names its entries


def is_url(text: str | os.PathLike) -> bool:
    """``scheme://...`` (https, http, s3, gs, ...): read over the network, never looked up on the local disk."""
    text = str(text)
    scheme, sep, rest = text.partition("://")
    return bool(sep) and bool(rest) and len(scheme) > 1 and scheme[0].isalpha() and scheme.isascii()


def url_key(url: str) -> str:
    """An http(s) URL without its query and fragment, for knowing the same file again (a signed URL's
    signature and expiry change each time it is signed; the file does not); any other text as it is."""
    if url.lower().startswith(("https://", "http://")):
        return url.split("#", 1)[0].split("?", 1)[0]
    return url


def url_name(url: str) -> str:
    """The file name a URL points at: its last path part, without query or fragment (``.../s1.svs?sig=x`` ->
    ``s1.svs``), for output names and progress bars."""
    return url.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def is_list_file(path: str | os.PathLike) -> bool:
    """A local file whose suffix makes it a list of data paths rather than data."""
    return not is_url(path) and Path(path).suffix.lower() in LIST_SUFFIXES and Path(path).is_file()


def _decode(raw: bytes, offset: int) -> str:
    """A line of the file as text; the first may start with a byte-order mark (Windows Notepad, Excel)."""
    return raw.decode("utf-8-sig" if offset == 0 else "utf-8", errors="replace").strip()


def _csv_row(line: str) -> list[str]:
    return next(csv.reader([line]), [])


class ListFile(Sequence[str]):
    """The entries of a list file, by index, each read from the file when asked for.

    ``.txt``: one entry a line; blank lines and lines starting with ``#`` are skipped. ``.csv``: a header, then
    one row a line (a quoted field across lines is refused); the column is the first of ``path``, ``url``,
    ``slide`` it has; rows with an empty value there are skipped.

    Raises:
        DataError: the file cannot be read, a CSV has none of the columns, or there is no entry.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.base = self.path.resolve().parent
        self.column: int | None = None
        self.offsets, self.lines = self._index()
        self._stamp = self._stat_stamp(self.path.stat())
        if not len(self.offsets):
            raise DataError(f"list file {str(self.path)!r} names no data (one path or URL per line)")
        self._handle: tuple[int, Any] | None = None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Byte offsets and 1-based line numbers of the entries, streaming the file once."""
        offsets, lines = array("q"), array("q")
        is_csv = self.path.suffix.lower() == ".csv"
        try:
            with self.path.open("rb") as f:
                offset = 0
                for number, raw in enumerate(f, start=1):
                    here, offset = offset, offset + len(raw)
                    text = _decode(raw, here)
                    if not text or (not is_csv and text.startswith("#")):  # a CSV's '#12' is a value
                        continue
                    if is_csv and text.count('"') % 2:  # its next line would be indexed as a row
                        raise DataError(
                            f"{self.path}, line {number}: a quoted field runs onto the next line; a CSV list "
                            "takes one row a line (remove the line breaks inside its cells)"
                        )
                    if is_csv and self.column is None:
                        self.column = self._header(text)
                        continue
                    if is_csv and not self._field(text):
                        continue
                    offsets.append(here)
                    lines.append(number)
        except OSError as e:
            raise DataError(f"list file {str(self.path)!r} cannot be read ({e.strerror or e})") from e
        return np.frombuffer(offsets, np.int64).copy(), np.frombuffer(lines, np.int64).copy()

    def _header(self, text: str) -> int:
        names = [n.strip().lower() for n in _csv_row(text)]
        for wanted in CSV_COLUMNS:
            if wanted in names:
                return names.index(wanted)
        raise DataError(
            f"{self.path}: a CSV list needs a column named one of {list(CSV_COLUMNS)}, got {names}"
        )

    def _field(self, text: str) -> str:
        row = _csv_row(text)
        return row[self.column].strip() if self.column is not None and self.column < len(row) else ""

    @staticmethod
    def _stat_stamp(st: os.stat_result) -> tuple[int, int]:
        return st.st_size, st.st_mtime_ns

    def _check_unchanged(self, st: os.stat_result) -> None:
        """Offsets index the file as it was: an edited list would silently give other entries."""
        if self._stat_stamp(st) != self._stamp:
            raise DataError(
                f"list file {str(self.path)!r} changed after it was read (size or modification time); "
                "its entries would no longer be the ones counted: restart with the list as it is now"
            )

    def _file(self) -> Any:
        """This process's handle (a forked or unpickled copy opens its own), checked against the indexed file."""
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), self.path.open("rb"))
        f = self._handle[1]
        self._check_unchanged(os.fstat(f.fileno()))
        return f

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def __len__(self) -> int:
        return len(self.offsets)

    def line_of(self, index: int) -> int:
        """The 1-based line number of entry ``index`` (for messages)."""
        return int(self.lines[index])

    def raw(self, index: int) -> str:
        """Entry ``index`` as written in the file."""
        f = self._file()
        offset = int(self.offsets[index])
        f.seek(offset)
        text = _decode(f.readline(), offset)
        return self._field(text) if self.column is not None else text

    def resolve(self, entry: str) -> str:
        """A URL as it is; a path absolute, relative ones against the list file's folder."""
        if is_url(entry):
            return entry
        path = Path(entry).expanduser()
        return str(path if path.is_absolute() else self.base / path)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("ListFile does not slice; iterate it or index one entry")
        n = len(self.offsets)
        if not -n <= index < n:
            raise IndexError(f"entry {index} of {n} in {self.path}")
        return self.resolve(self.raw(index % n))

    def __iter__(self) -> Iterator[str]:
        """Every entry in order, streamed (one sequential read, not a seek per entry)."""
        with self.path.open("rb") as f:
            self._check_unchanged(os.fstat(f.fileno()))
            for offset in self.offsets:
                if f.tell() != offset:
                    f.seek(int(offset))
                text = _decode(f.readline(), int(offset))
                yield self.resolve(self._field(text) if self.column is not None else text)

    def close(self) -> None:
        if self._handle is not None:
            self._handle[1].close()
            self._handle = None


def read_list(path: str | os.PathLike) -> ListFile:
    """:class:`ListFile` of ``path`` (see there)."""
    return ListFile(path)
