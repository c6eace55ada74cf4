"""List files (``.txt`` / ``.csv`` of paths and URLs): indexed by byte offset, read on demand."""

from __future__ import annotations

import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from foundation.data.listing import ListFile, is_list_file, is_url
from foundation.errors import DataError


def test_is_url() -> None:
    assert is_url("https://host/a.svs") and is_url("s3://bucket/key.tif") and is_url("gs://b/k")
    assert not is_url("/data/a.svs") and not is_url("a.svs") and not is_url("C:\\data\\a.svs")
    assert not is_url("://nothing") and not is_url("https://")


def test_text_list_skips_comments_and_resolves_relative_paths(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    path = folder / "slides.txt"
    path.write_text(
        "# my archive\n\nsub/a.svs\n   /abs/b.tif  \nhttps://host:8000/c.svs?x=1\n# the end\n../up.tif\n"
    )
    entries = ListFile(path)
    assert len(entries) == 4
    assert list(entries) == [
        str(folder.resolve() / "sub/a.svs"),
        "/abs/b.tif",
        "https://host:8000/c.svs?x=1",
        str(folder.resolve() / "../up.tif"),
    ]
    assert entries[-1] == entries[3]
    assert entries.line_of(0) == 3 and entries.line_of(3) == 7
    with pytest.raises(IndexError):
        entries[4]
    assert is_list_file(path) and not is_list_file(tmp_path / "missing.txt")


def test_a_byte_order_mark_crlf_and_multibyte_names_do_not_shift_entries(tmp_path: Path) -> None:
    """A .txt saved by Notepad starts with a BOM: its first entry read '\ufeffa.svs' (a slide not found)."""
    path = tmp_path / "slides.txt"
    path.write_bytes("\ufeffa.svs\r\n# é\r\n\r\nß/é.svs\r\nhttps://h/ü.svs".encode())
    entries = ListFile(path)
    want = [str(tmp_path.resolve() / "a.svs"), str(tmp_path.resolve() / "ß/é.svs"), "https://h/ü.svs"]
    assert list(entries) == want
    assert [entries[i] for i in range(len(entries))] == want
    assert [entries.line_of(i) for i in range(3)] == [1, 4, 5]


def test_csv_list_uses_the_path_column(tmp_path: Path) -> None:
    path = tmp_path / "slides.csv"
    path.write_text('\ufeffcase,Slide,label\n1,"a, b.svs",x\n2,,y\n3,s3://bucket/c.tif,z\n')
    entries = ListFile(path)
    assert list(entries) == [str(tmp_path.resolve() / "a, b.svs"), "s3://bucket/c.tif"]


def test_csv_rows_are_never_comments_and_a_cell_across_lines_is_refused(tmp_path: Path) -> None:
    """A row starting with '#' (case '#12') was dropped as a comment; a cell with a line break (a spreadsheet's
    notes) made its second half a row of its own, read as another slide."""
    path = tmp_path / "slides.csv"
    path.write_text("case,path\n#12,a.svs\n13,b.svs\n")
    assert list(ListFile(path)) == [str(tmp_path.resolve() / "a.svs"), str(tmp_path.resolve() / "b.svs")]
    path.write_text('path,notes\na.svs,"first line\nsecond, line"\nb.svs,ok\n')
    with pytest.raises(DataError, match=r"slides\.csv, line 2: a quoted field runs onto the next line"):
        ListFile(path)


def test_csv_without_a_path_column_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "slides.csv"
    path.write_text("case,label\n1,x\n")
    with pytest.raises(DataError, match=r"slides\.csv.*'path', 'url', 'slide'.*\['case', 'label'\]"):
        ListFile(path)


def test_an_empty_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(DataError, match="empty.txt.*names no data"):
        ListFile(path)


def test_100k_entries_cost_an_offset_array_not_100k_strings(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with path.open("w") as f:
        for i in range(100_000):
            f.write(f"slides/case{i:06d}/slide_{i:06d}.svs\n")
    tracemalloc.start()
    entries = ListFile(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(entries) == 100_000
    assert entries.offsets.dtype == np.int64
    assert peak < 8 << 20  # 100k Path objects alone would be ~20 MB
    assert entries[99_999].endswith("slides/case099999/slide_099999.svs")
    assert entries[12_345].endswith("slide_012345.svs")


def test_a_copy_in_another_process_reads_with_its_own_handle(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("a.svs\nb.svs\n")
    entries = ListFile(path)
    assert entries[1].endswith("b.svs")  # opens this process's handle
    copy = pickle.loads(pickle.dumps(entries))
    assert copy._handle is None and copy[0].endswith("a.svs")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must not share the parent's file offset
        os.write(w, entries[0].encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 4096).decode().endswith("a.svs")
    assert entries[1].endswith("b.svs")


def test_a_list_edited_after_indexing_is_an_error_not_other_entries(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("a.svs\nb.svs\n")
    entries = ListFile(path)
    assert entries[0].endswith("a.svs")
    path.write_text("new.svs\na.svs\nb.svs\n")
    with pytest.raises(DataError, match=r"l\.txt' changed after it was read"):
        entries[1]
    with pytest.raises(DataError, match="changed after it was read"):
        list(entries)
