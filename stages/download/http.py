"""Fetch one source file over HTTP(S) with the standard library: mirrors, resume, retries, verification.

Policy, per URL (the source's ``url``, then each of its ``mirrors`` in order):

- a URL that cannot be reached at all (DNS failure, connection refused, host unreachable, connect timeout) or
  that answers a client error (404, 403, ...) is given up at once, so that a machine without network fails in
  seconds, not minutes;
- a transfer that breaks off (connection reset or closed early, read timeout) or a 5xx/429 answer is retried
  ``retries`` times, sleeping ``backoff * 2**k`` seconds, and resumes from the ``.part`` file with a
  ``Range: bytes=<n>-`` request (a 206 answer appends; a 200 answer restarts from zero);
- the finished ``.part`` is checked against the source's size and sha256 and only then renamed onto
  ``<dest_dir>/<filename>``; a bad file is deleted and the next URL is tried.

Google Drive mirrors are written ``gdrive:<id>``. Drive serves small files directly; for large ones it first
answers an HTML page ("can't scan this file for viruses") whose form carries a ``confirm`` token: the form is
followed once. A page without that form (quota exceeded, file not shared) fails that URL with a clear reason.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

from pipeline.catalog import Source
from pipeline.errors import ChecksumError, DownloadError
from pipeline.progress import progress_bar

GDRIVE_PREFIX = "gdrive:"
GDRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"
CHUNK_BYTES = 1 << 20
MAX_PAGE_BYTES = 1 << 20  # a Drive confirmation page is a few kB; never read a whole file as a page
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "gwot-pipeline-download/0.1"


class _TransientError(Exception):
    """The transfer broke off or the server is briefly unavailable: retry, resuming from the ``.part``."""


class _UrlFailed(Exception):
    """This URL cannot deliver the file: move on to the next mirror."""


class _DrivePage(Exception):
    """Google Drive answered an HTML page (at ``url``) instead of the file."""

    def __init__(self, page: bytes, url: str):
        super().__init__(url)
        self.page = page
        self.url = url


def resolve_url(url: str) -> str:
    """The HTTP(S) URL for a catalog URL: ``gdrive:<id>`` becomes Drive's direct-download URL."""
    if url.startswith(GDRIVE_PREFIX):
        return GDRIVE_URL.format(id=url.removeprefix(GDRIVE_PREFIX))
    return url


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, source: Source, *, label: str | Path | None = None) -> str:
    """Check ``path`` against ``source``'s size and sha256 (where the catalog gives them); return its sha256.

    Raises ChecksumError naming ``label`` (default: ``path``), the expected and the actual value.
    """
    label = label or path
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        raise ChecksumError(f"{label}: size mismatch for {source.filename}: expected {source.size} bytes, got {size}")
    sha256 = file_sha256(path)
    if source.sha256 is not None and sha256 != source.sha256.lower():
        raise ChecksumError(
            f"{label}: sha256 mismatch for {source.filename}: expected {source.sha256.lower()}, got {sha256}"
        )
    return sha256


class _ShortConnectMixin:
    """Connect (DNS, TCP, TLS handshake) under ``connect_timeout``; then read under the request's timeout."""

    timeout: float | None
    sock: Any

    def __init__(self, *args: Any, connect_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        read_timeout = self.timeout
        self.timeout = min(self.connect_timeout, read_timeout or self.connect_timeout)
        try:
            super().connect()
        finally:
            self.timeout = read_timeout
        self.sock.settimeout(read_timeout)


class _HTTPConnection(_ShortConnectMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ShortConnectMixin, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connect_timeout: float):
        super().__init__()
        self.connect_timeout = connect_timeout

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req, connect_timeout=self.connect_timeout)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connect_timeout: float):
        super().__init__()
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl.create_default_context()

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self.ssl_context, connect_timeout=self.connect_timeout)


def _build_opener(connect_timeout: float = 10.0) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections give up after ``connect_timeout`` seconds of connecting."""
    return urllib.request.build_opener(_HTTPHandler(connect_timeout), _HTTPSHandler(connect_timeout))


class _DriveFormParser(HTMLParser):
    """Collects the action and the hidden inputs of the form on a Google Drive confirmation page."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("type") == "hidden" and "name" in values:
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _drive_confirm_url(page: bytes, page_url: str) -> str:
    """The download URL behind a Drive confirmation page, or _UrlFailed when the page has no such form."""
    parser = _DriveFormParser()
    parser.feed(page.decode("utf-8", errors="replace"))
    if not parser.action or "confirm" not in parser.fields:
        title = re.search(rb"<title>(.*?)</title>", page, re.S | re.I)
        shown = title.group(1).decode("utf-8", "replace").strip() if title else "no title"
        raise _UrlFailed(
            f"Google Drive answered an HTML page ({shown!r}) without a download form: the file may be over "
            "its download quota or not shared; open the URL in a browser and place the file by hand"
        )
    return f"{urljoin(page_url, parser.action)}?{urlencode(parser.fields)}"


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes <start>-<end>/<total>`` header."""
    match = re.match(r"bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


def _transfer(
    url: str,
    part: Path,
    *,
    opener: urllib.request.OpenerDirector,
    timeout: float,
    bar: Any,
    drive: bool,
) -> None:
    """One request for ``url``, appending to (or restarting) ``part``; raise a classified error on failure."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            # the .part is already as long as (or longer than) the file: start again from zero
            part.unlink()
            raise _TransientError("the server refused to resume the partial file; restarting") from exc
        if exc.code in RETRY_STATUS:
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from exc
        raise _UrlFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _UrlFailed(f"cannot connect ({exc.reason})") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _TransientError(f"no answer ({exc!r})") from exc
    with response:
        if drive and response.headers.get_content_type() == "text/html":
            raise _DrivePage(response.read(MAX_PAGE_BYTES), response.geturl())
        resumed = response.status == 206
        if resumed and _content_range_start(response.headers.get("Content-Range")) != offset:
            part.unlink()
            raise _TransientError(f"the server resumed at the wrong byte (asked for {offset}); restarting")
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        bar.reset(total=None if expected is None else start + expected)
        bar.update(start)
        received = 0
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read1(CHUNK_BYTES):  # what has arrived: a stall keeps it
                    _write(out, chunk, part, start + received, None if expected is None else start + expected)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise _TransientError(f"transfer broke off after {start + received} bytes ({exc!r})") from exc
    if expected is not None and received < expected:
        raise _TransientError(f"connection closed after {start + received} of {start + expected} bytes")


def _write(out: Any, chunk: bytes, part: Path, written: int, total: int | None) -> None:
    """Append ``chunk`` to the open ``part``; a full disk is a DownloadError naming the space still needed."""
    try:
        out.write(chunk)
        out.flush()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        needed = f"{total - written} more bytes" if total is not None else "more space"
        raise DownloadError(
            f"{part}: the disk is full after {written} bytes ({needed} needed); free space and run again: the "
            "download resumes from this partial file"
        ) from None


def _download(
    url: str,
    part: Path,
    *,
    opener: urllib.request.OpenerDirector,
    retries: int,
    backoff: float,
    timeout: float,
    sleep: Callable[[float], None],
    bar: Any,
) -> None:
    """Bring ``part`` to the complete content of ``url``, retrying transient failures with backoff."""
    drive = url.startswith(GDRIVE_PREFIX)
    url = resolve_url(url)
    confirmed = False
    failures = 0
    while True:
        try:
            _transfer(url, part, opener=opener, timeout=timeout, bar=bar, drive=drive)
            return
        except _DrivePage as answer:
            if confirmed:
                raise _UrlFailed(
                    "Google Drive answered an HTML page again after the confirmation; open the URL in a "
                    "browser and place the file by hand"
                ) from answer
            url, confirmed = _drive_confirm_url(answer.page, answer.url), True
        except _TransientError as exc:
            failures += 1
            if failures > retries:
                raise _UrlFailed(f"{exc}; gave up after {retries} retries") from exc
            sleep(backoff * 2 ** (failures - 1))


def fetch(
    source: Source,
    dest_dir: Path,
    *,
    progress: bool = False,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    opener: urllib.request.OpenerDirector | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download ``source`` to ``dest_dir / source.filename`` (from its URL, then its mirrors) and verify it.

    ``timeout`` bounds each read, ``connect_timeout`` each connection; ``retries``/``backoff``/``sleep`` set
    the retry schedule of interrupted transfers; ``opener`` replaces the urllib opener (default: one with the
    short connect timeout). An interrupted download leaves ``<filename>.part``, which the next call
    resumes. Raises ChecksumError when every URL failed and at least one delivered a file of the wrong size
    or sha256, otherwise DownloadError naming every URL tried and how to place the file by hand.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / source.filename
    part = final.with_name(f"{final.name}.part")
    opener = opener or _build_opener(connect_timeout)
    failures: list[str] = []
    bad_checksum = False
    with progress_bar(enabled=progress, total=source.size, desc=source.filename, unit="B") as bar:
        for url in (source.url, *source.mirrors):
            try:
                _download(
                    url,
                    part,
                    opener=opener,
                    retries=retries,
                    backoff=backoff,
                    timeout=timeout,
                    sleep=sleep,
                    bar=bar,
                )
                verify(part, source, label=url)
            except _UrlFailed as exc:
                failures.append(f"  - {url}: {exc}")
                continue
            except ChecksumError as exc:
                part.unlink()
                failures.append(f"  - {exc}")
                bad_checksum = True
                continue
            os.replace(part, final)
            return final
    error = ChecksumError if bad_checksum else DownloadError
    raise error(
        f"could not download {source.filename} from any of its {len(failures)} URL(s):\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and either copy it to {final} or pass `--archive PATH --dataset <name>` to "
        "`pipeline run --stage download`."
    )
