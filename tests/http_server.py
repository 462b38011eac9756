"""A local HTTP file server for tests (downloads, the CLI): Range support, scripted faults, a request log."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass
class Served:
    """What the server holds and how it misbehaves; each request is logged as ``(path, query, Range)``."""

    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)  # path -> faults, one consumed per request
    ignore_range: set[str] = field(default_factory=set)  # paths answered 200 even to a Range request
    confirm_pages: set[str] = field(default_factory=set)  # paths that answer a Drive-style page until confirmed
    content_types: dict[str, str] = field(default_factory=dict)  # path -> Content-Type (default: binary)
    stall: float = 2.0  # seconds a "stall" fault keeps the connection open and silent after half the body
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    base: str = ""

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return f"{self.base}{path}"

    def count(self, path: str) -> int:
        """How many requests asked for ``path``."""
        return sum(1 for logged, _, _ in self.requests if logged == path)


DRIVE_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="{id}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="abc-123"></form>
</body></html>"""


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread for long
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request log lines."""

    def do_GET(self) -> None:
        served: Served = self.server.served  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        range_header = self.headers.get("Range")
        served.requests.append((parts.path, parts.query, range_header))
        if parts.path in served.confirm_pages and "confirm" not in parse_qs(parts.query):
            page = DRIVE_PAGE.format(action=parts.path, id=parse_qs(parts.query)["id"][0]).encode()
            self._answer(200, page, {"Content-Type": "text/html; charset=utf-8"})
            return
        body = served.files.get(parts.path)
        if body is None:
            self.send_error(404)
            return
        queue = served.faults.get(parts.path) or []
        fault = queue.pop(0) if queue else None
        if fault == "500":
            self.send_error(500)
            return
        start = 0
        if range_header and parts.path not in served.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_error(416)
                return
        headers = {"Content-Type": served.content_types.get(parts.path, "application/octet-stream")}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        self._answer(
            206 if start else 200,
            payload,
            headers,
            cut=len(payload) // 2 if fault in ("drop", "stall") else None,
            stall=fault == "stall",
        )

    def _answer(
        self, status: int, payload: bytes, headers: dict[str, str], cut: int | None = None, stall: bool = False
    ) -> None:
        """Send ``payload`` with its full Content-Length, or only ``cut`` bytes of it before hanging up
        (``stall``: after keeping the connection silent for ``Served.stall`` seconds)."""
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload if cut is None else payload[:cut])
        if stall:
            self.wfile.flush()
            time.sleep(self.server.served.stall)  # type: ignore[attr-defined]  # silent, connection open
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[Served]:
    """A file server on 127.0.0.1 in a background thread, stopped when the test ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    served = Served(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.served = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on a local port nothing listens on: connecting is refused at once, like a machine offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.zip"
