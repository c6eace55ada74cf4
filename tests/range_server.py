"""A local HTTP file server on 127.0.0.1 that honours Range requests and can drop connections mid-read.

Tests read slides and rasters "by URL" through it: fsspec/aiohttp and GDAL's /vsicurl/ both ask for byte
ranges. ``drop`` tells it to cut the connection after a number of body bytes, for the next ``times`` GET
requests of a file (a flaky network that a retry gets through) or for all of them (a URL that never reads),
optionally going silent for ``stall_s`` first (a transfer that hangs);
``fail`` answers an HTTP status (a 503 of an overloaded server, a 403 of an expired signature) instead.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Drop:
    """Cut GET responses of one file after ``after_bytes`` body bytes, ``times`` times (None: always), after
    ``stall_s`` seconds of silence."""

    after_bytes: int
    times: int | None = None
    stall_s: float = 0.0


@dataclass
class ServerState:
    root: Path
    drops: dict[str, Drop] = field(default_factory=dict)
    fails: dict[str, list[int]] = field(
        default_factory=dict
    )  # file name -> [status, times left (-1: always)]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_drop(self, name: str) -> Drop | None:
        """How to cut this response, or None to send it whole."""
        with self.lock:
            drop = self.drops.get(name)
            if drop is None:
                return None
            if drop.times is not None:
                if drop.times <= 0:
                    return None
                drop.times -= 1
            return drop

    def take_fail(self, name: str) -> int | None:
        """The status to answer this request of ``name`` with, or None to serve it."""
        with self.lock:
            fail = self.fails.get(name)
            if fail is None or fail[1] == 0:
                return None
            if fail[1] > 0:
                fail[1] -= 1
            return fail[0]


def _handler(state: ServerState) -> type[SimpleHTTPRequestHandler]:
    class RangeHandler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(state.root), **kwargs)

        def log_message(self, format: str, *args) -> None:  # quiet
            pass

        def _file(self) -> Path | None:
            """The file asked for, or None when the answer (a 404, or a status set by ``fail``) is sent."""
            path = Path(self.translate_path(self.path))
            status = state.take_fail(path.name)
            if status is None and path.is_file():
                return path
            self.send_response(status or 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None

        def do_HEAD(self) -> None:
            state.requests.append(("HEAD", self.path))
            file = self._file()
            if file is None:
                return
            self.send_response(200)
            self.send_header("Content-Length", str(file.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            file = self._file()
            if file is None:
                return
            size = file.stat().st_size
            start, end = 0, size - 1
            match = _RANGE.match(self.headers.get("Range", "").strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                else:  # a suffix range: the last N bytes
                    start = max(0, size - int(match.group(2)))
                if start >= size or end < start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            length = end - start + 1
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            cut = state.take_drop(file.name)
            if cut is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            with file.open("rb") as f:
                f.seek(start)
                body = f.read(length)
            if cut is None:
                self.wfile.write(body)
                return
            self.wfile.write(body[: cut.after_bytes])  # then the connection goes away mid-body
            self.wfile.flush()
            time.sleep(cut.stall_s)
            self.close_connection = True
            self.connection.shutdown(2)

    return RangeHandler


@dataclass
class RangeServer:
    url: str
    state: ServerState

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def drop(self, name: str, after_bytes: int = 100, times: int | None = None, stall_s: float = 0.0) -> None:
        self.state.drops[name] = Drop(after_bytes, times, stall_s)

    def fail(self, name: str, status: int, times: int | None = None) -> None:
        """Answer ``status`` to the next ``times`` requests (HEAD or GET) of ``name`` (None: to all)."""
        self.state.fails[name] = [status, -1 if times is None else times]

    def gets(self, name: str) -> int:
        return sum(1 for method, path in self.state.requests if method == "GET" and path.endswith("/" + name))


@contextmanager
def serve(root: Path) -> Iterator[RangeServer]:
    """Serve ``root`` on a free 127.0.0.1 port for the ``with`` block; stopped and joined after it."""
    state = ServerState(Path(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield RangeServer(f"http://127.0.0.1:{server.server_address[1]}", state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
