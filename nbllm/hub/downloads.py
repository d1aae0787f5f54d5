"""Downloading model files: resumable, verified, and never visible half-written.

A download is written to ``.<name>.partial`` in the models folder, beside a small sidecar
``.<name>.partial.json`` that remembers the URL, the server's validator (a strong ETag, or a
Last-Modified date old enough to be strong), the checksum the whole file must have when one is
known, and its size. An interrupted download resumes with an HTTP Range request from the partial
file's size only when the server's file is *proven* to be the one the kept part came from:

- the validator is sent back with ``If-Range`` and the server confirms it (a changed file comes
  back whole, as a 200); a weak ETag (``W/"..."``) only promises "equivalent", so it is never used;
- or a checksum is known (given, the catalog's, Hugging Face's ``X-Linked-ETag``) and checked at
  the end; a resumed file that fails it is downloaded once more from the start.

Otherwise the download starts over: appending the rest of a *changed* file to the part of the old
one would install a splice that matches neither. A partial file from another URL is never appended
to, and a server that answers 200 instead of 206 sends the whole file again, written from the start.

When the last byte is in, the SHA-256 is checked, the file must pass the GGUF gate, and only then is
it moved into place with ``os.replace``. So a ``.gguf`` file under its real name in the models
folder is always complete and valid, and the registry never sees a partial one. Without a
Content-Length the connection closing is how the body ends, so a cut looks like the end: a file
that starts like GGUF but ends before its last tensor is kept as a cut-off partial, not deleted.
A sidecar never outlives the bytes it describes: a download that fails before writing any byte
(a disk-space refusal, an error, a cancel) leaves nothing behind.

The SHA-256 is remembered (``identity.remember``) and recorded in ``checksums.json`` in the models
folder together with what verified it (or that nothing did), so ``nbllm.verify()`` can check the
file again later and tell "verified" from "no checksum known".

Standard library only (urllib): a download needs no new dependency. The front end draws the bar
(``core/progress.py``).
"""

from __future__ import annotations

import contextlib
import email.message
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

from nbllm.core import identity, paths
from nbllm.core.errors import DownloadError, InvalidModelFileError
from nbllm.core.gguf_file import GGUF_MAGIC, read_gguf
from nbllm.core.progress import progress_bar
from nbllm.core.units import format_bytes

log = logging.getLogger("nbllm")

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 30.0  # per socket operation, not for the whole download
PROGRESS_INTERVAL = 0.1  # seconds between progress callbacks: a widget must not be flooded
SPACE_MARGIN = 8 * 2**20  # room left for the filesystem's own needs
# A Last-Modified date is a strong validator (fit for If-Range) only when it is at least this many
# seconds older than the response's Date (RFC 9110 8.8.2.2): dates have one-second resolution, so
# a file changed twice within a second would otherwise keep its date.
STRONG_DATE_SECONDS = 60
CHECKSUMS_FILE = "checksums.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Download:
    """What a download produced."""

    path: Path
    sha256: str
    verified_by: str  # where the expected checksum came from, or why there was none
    size: int
    url: str | None = None
    resumed_from: int = 0  # bytes that were already there from an interrupted download
    already_present: bool = False

    def __str__(self) -> str:
        if self.already_present:
            return f"Already downloaded: {self.path} ({format_bytes(self.size)}; checksum {self.verified_by})."
        resumed = f", resumed at {format_bytes(self.resumed_from)}" if self.resumed_from else ""
        return f"Downloaded {self.path} ({format_bytes(self.size)}{resumed}); SHA-256 {self.verified_by}."


# ---------------------------------------------------------------------------- names and URLs


def hf_endpoint() -> str:
    """Where Hugging Face is: ``$NBLLM_HF_ENDPOINT`` (a mirror, or a test server) or huggingface.co."""
    return (os.environ.get("NBLLM_HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_url(endpoint: str, repo: str, file: str, revision: str = "main") -> str:
    quote = urllib.parse.quote
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(file, safe='/')}"


def is_remote(source: str) -> bool:
    return source.strip().lower().startswith(("https://", "http://", "hf://"))


_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_url(source: str) -> str:
    """``hf://owner/repo/file`` -> ``{endpoint}/owner/repo/resolve/main/file``; http(s) URLs unchanged."""
    text = source.strip()
    if text.lower().startswith("hf://"):
        parts = text[5:].strip("/").split("/")
        # Owner and repository names are letters, digits, "-", "_" and "."; no part of the path
        # may be "." or "..", which would climb out of the repository.
        names_ok = all(_HF_NAME.fullmatch(part) for part in parts[:2])
        if len(parts) < 3 or not names_ok or not all(part and part not in (".", "..") for part in parts):
            raise DownloadError(
                f"{source!r} is not hf://OWNER/REPO/FILE (e.g. hf://TheBloke/phi-2-GGUF/phi-2.Q4_K_M.gguf)."
            )
        return hf_url(hf_endpoint(), "/".join(parts[:2]), "/".join(parts[2:]))
    if urllib.parse.urlsplit(text).scheme.lower() in ("http", "https"):
        return text
    raise DownloadError(
        f"Cannot download {source!r}: give a catalog name (nbllm models list; nbllm.catalog() in Python), "
        "an https:// URL, or hf://owner/repo/file.gguf."
    )


def safe_file_name(name: str, origin: str, folder: Path | None = None) -> str:
    """``name`` if it is a plain ``.gguf`` file name; anything that could land outside the models
    folder (a separator, ``..``, an absolute or drive path) or hide there is refused."""
    problem = None
    if not name or name != name.strip():
        problem = "it is empty or has spaces around it"
    elif "/" in name or "\\" in name or ":" in name:
        problem = "it contains a path separator, so it could write outside the models folder"
    elif name.startswith("."):
        problem = "it starts with a dot (hidden names there are nbllm's own partial downloads)"
    elif any(ord(c) < 32 for c in name):
        problem = "it contains control characters"
    elif not name.lower().endswith(".gguf"):
        problem = "it does not end in .gguf"
    elif len(name.encode("utf-8")) > 255:
        problem = "it is longer than a file name may be"
    if problem:
        where = folder or paths.models_dir()
        raise DownloadError(
            f"Refusing to save a download as {name!r} ({origin}): {problem}. nbllm writes only plain .gguf "
            f"file names into its models folder ({where}); choose one with --file-name NAME.gguf "
            "(file_name= in Python)."
        )
    return name


def url_file_name(url: str, folder: Path | None = None) -> str | None:
    """The file name a URL ends with, if it is a ``.gguf`` name (None: ask the server)."""
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not last.lower().endswith(".gguf"):
        return None
    return safe_file_name(last, f"the end of the URL {url}", folder)


def linked_sha256(value: str | None) -> str | None:
    """The SHA-256 in an ``X-Linked-ETag`` header (Hugging Face sends it for LFS files), if it is one."""
    if not value:
        return None
    text = value.strip().removeprefix("W/").strip('"').lower()
    return text if _SHA256.match(text) else None


def normalize_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(text):
        raise DownloadError(f"{value!r} is not a SHA-256 checksum: expected 64 hexadecimal characters.")
    return text


# ---------------------------------------------------------------------------- the checksum record


def _checksums_path(folder: Path) -> Path:
    return folder / CHECKSUMS_FILE


def load_checksums(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "size", "url", "verified_by", "recorded_at"}}`` of the models folder."""
    try:
        data = json.loads(_checksums_path(folder or paths.models_dir()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _save_checksums(folder: Path, data: dict[str, dict[str, Any]]) -> None:
    target = _checksums_path(folder)
    try:
        paths.write_text_atomically(target, json.dumps(data, indent=1, sort_keys=True))
    except OSError as error:
        log.warning("Could not record checksums in %s: %s", target, error)


_record_lock = threading.Lock()


def record_checksum(path: Path, sha256: str, *, url: str | None, verified_by: str) -> None:
    with _record_lock:
        data = load_checksums(path.parent)
        data[path.name] = {
            "sha256": sha256,
            "size": path.stat().st_size,
            "url": url,
            "verified_by": verified_by,
            "recorded_at": time.time(),
        }
        _save_checksums(path.parent, data)


def forget_checksum(path: Path) -> None:
    with _record_lock:
        data = load_checksums(path.parent)
        if data.pop(path.name, None) is not None:
            _save_checksums(path.parent, data)


def recorded_sha256(path: Path, *, any_size: bool = False) -> str | None:
    """The SHA-256 recorded when ``path`` was downloaded: None if never, or if its size changed
    (unless ``any_size``: ``verify`` wants to report a changed file as a mismatch)."""
    record = recorded_check(path, any_size=any_size)
    return record[0] if record else None


def recorded_check(path: Path, *, any_size: bool = False) -> tuple[str, bool] | None:
    """The SHA-256 recorded when ``path`` was downloaded, and whether anything verified it then
    (a checksum given, the catalog's, Hugging Face's). Unverified, it only says what the file was
    when it arrived, not that it is the file that was meant. None as for ``recorded_sha256``."""
    entry = load_checksums(path.parent).get(path.name)
    if not entry:
        return None
    try:
        if not any_size and entry.get("size") != path.stat().st_size:
            return None
    except OSError:
        return None
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        return None
    how = entry.get("verified_by")
    return digest, isinstance(how, str) and how.startswith("verified")


# ---------------------------------------------------------------------------- HTTP


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the partial file is not a prefix the server can continue."""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only, and keeps what a hop said about the file.

    Hugging Face answers ``/resolve/`` for an LFS file with a redirect to its CDN; the SHA-256
    comes in that redirect's ``X-Linked-ETag``, not in the final response, so it is noted here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sha256: str | None = None

    def note(self, headers: Any) -> None:
        digest = linked_sha256(headers.get("X-Linked-ETag"))
        if digest:
            self.sha256 = digest

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        self.note(headers)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url} redirected to {newurl}, which is not an http(s) URL: not followed.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Session:
    """One download's requests: the same URL, maybe twice (restart), with redirects noted."""

    def __init__(self, url: str, timeout: float) -> None:
        from nbllm._version import __version__

        self.url = url
        self.timeout = timeout
        self.redirects = _Redirects()
        self.opener = urllib.request.build_opener(self.redirects)
        self.user_agent = f"nbllm/{__version__}"

    @property
    def linked_sha256(self) -> str | None:
        """Hugging Face's checksum for the response last opened (its redirects included)."""
        return self.redirects.sha256

    def open(self, offset: int = 0, validator: str | None = None) -> http.client.HTTPResponse:
        self.redirects.sha256 = None  # what this request's hops say, not an earlier request's
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator  # changed content -> the server sends all of it (200)
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response: http.client.HTTPResponse = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416:
                raise _RangeNotSatisfiable from None
            raise _http_error(self.url, error.code, str(error.reason)) from None
        except urllib.error.URLError as error:
            raise _network_error(self.url, error.reason) from None
        except (http.client.HTTPException, OSError) as error:
            raise _network_error(self.url, error) from None
        self.redirects.note(response.headers)
        return response


def _http_error(url: str, code: int, reason: str) -> DownloadError:
    status = f"HTTP {code} {reason}".strip()
    if code == 404:
        advice = (
            "There is no file at that address: check the repository and the file name "
            "(a catalog entry may be out of date; nbllm models list shows the known ones)."
        )
    elif code in (401, 403):
        advice = (
            "The server refused access. Gated Hugging Face repositories need their license accepted on the "
            f"website; download the file in a browser and copy it into {paths.models_dir()}."
        )
    elif code >= 500:
        advice = "The server failed (an error on its side, not yours). Try again later: the download resumes."
    else:
        advice = "Check the URL."
    return DownloadError(f"Cannot download {url}: the server answered {status}. {advice}")


def _network_error(url: str, reason: object) -> DownloadError:
    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused: nothing is listening there"
    elif isinstance(reason, socket.gaierror):
        why = f"the host name {host} could not be resolved: no network, or no DNS"
    elif isinstance(reason, TimeoutError):
        why = "the connection timed out"
    elif isinstance(reason, ssl.SSLError):
        why = f"the secure connection failed: {reason}"
    else:
        why = str(reason) or type(reason).__name__
    return DownloadError(
        f"Cannot download {url}: cannot reach {host} ({why}). Check the network connection (and a proxy, or "
        f"NBLLM_HF_ENDPOINT when you use a mirror), or download the file another way and copy it into "
        f"{paths.models_dir()}."
    )


def _disposition_name(response: http.client.HTTPResponse, url: str, folder: Path) -> str:
    """The file name the server suggests (``Content-Disposition``), checked like any other name."""
    value = response.headers.get("Content-Disposition")
    message = email.message.Message()
    if value:
        message["Content-Disposition"] = value
    suggested = message.get_filename()  # handles filename*=UTF-8''... too
    if not suggested:
        raise DownloadError(
            f"Cannot tell which file {url} is: the URL does not end in a .gguf name and the server suggests "
            "none. Choose one with --file-name NAME.gguf (file_name= in Python)."
        )
    return safe_file_name(suggested, "the name the server suggested (Content-Disposition)", folder)


def _content_length(response: http.client.HTTPResponse) -> int | None:
    try:
        value = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _content_range(response: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """(first byte, whole file's size) of a 206's ``Content-Range: bytes 100-199/2000``; None where unsaid."""
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match:
        start = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
        return (int(start.group(1)) if start else None), None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) != "*" else None)


def _validator(response: http.client.HTTPResponse) -> str | None:
    """What ``If-Range`` may carry (RFC 9110 13.1.5): a strong ETag, else a strong Last-Modified date.

    A weak ETag (``W/"..."``) promises only an equivalent file, not the same bytes, so it is never
    sent; nor is an unquoted one (not an entity-tag at all: a server would read it as a date). A
    Last-Modified date is strong only when the response's Date is at least STRONG_DATE_SECONDS later.
    """
    etag = (response.headers.get("ETag") or "").strip()
    if len(etag) >= 2 and etag.startswith('"') and etag.endswith('"'):
        return etag
    modified = (response.headers.get("Last-Modified") or "").strip()
    date = response.headers.get("Date")
    if modified and date and _seconds_between(modified, date) >= STRONG_DATE_SECONDS:
        return modified
    return None


def _seconds_between(earlier: str, later: str) -> float:
    """``later - earlier`` for two HTTP dates; minus infinity when either is not one."""
    try:
        return (parsedate_to_datetime(later) - parsedate_to_datetime(earlier)).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):  # malformed, or naive minus aware
        return float("-inf")


def _is_etag(validator: str) -> bool:
    return validator.startswith('"')


# ---------------------------------------------------------------------------- the partial file


@dataclass(frozen=True)
class _Checksum:
    """A SHA-256 the whole file must have, and where it came from (for messages)."""

    sha256: str
    source: str  # "given", "catalog", "X-Linked-ETag"


@dataclass(frozen=True)
class _Resume:
    """What the sidecar remembers of a partial file: where to continue, and what can prove that
    the server's file is still the one the kept part came from."""

    offset: int
    validator: str | None  # a strong ETag or Last-Modified date, for If-Range
    checksum: _Checksum | None  # what the whole file must hash to, when that was known
    total: int | None  # the whole file's size, when the server said


@dataclass(frozen=True)
class _Partial:
    data: Path
    meta: Path

    @classmethod
    def of(cls, folder: Path, name: str) -> _Partial:
        return cls(folder / f".{name}.partial", folder / f".{name}.partial.json")

    def size(self) -> int:
        try:
            return self.data.stat().st_size
        except OSError:
            return 0

    def read_meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_meta(self, url: str, validator: str | None, checksum: _Checksum | None, total: int | None) -> None:
        meta = {
            "url": url,
            "validator": validator,
            "sha256": checksum.sha256 if checksum else None,
            "sha256_source": checksum.source if checksum else None,
            "total": total,
        }
        self.meta.write_text(json.dumps(meta), encoding="utf-8")

    def discard(self) -> None:
        self.data.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)

    def resume_point(self, url: str) -> _Resume | None:
        """What the kept part is, or None when there is nothing to resume.

        A partial file without a sidecar, or from another URL, is thrown away: appending to it
        would splice two different files together.
        """
        size, meta = self.size(), self.read_meta()
        if size and meta.get("url") == url:
            validator, digest, source, total = (meta.get(k) for k in ("validator", "sha256", "sha256_source", "total"))
            checksum = None
            if isinstance(digest, str) and _SHA256.match(digest):
                checksum = _Checksum(digest, source if isinstance(source, str) else "recorded with the partial file")
            return _Resume(
                size,
                validator if isinstance(validator, str) and validator else None,
                checksum,
                total if isinstance(total, int) and not isinstance(total, bool) else None,
            )
        if size or meta:
            self.discard()
        return None

    def resumable(self) -> bool:
        """Whether a later run can prove the server's file unchanged (and so resume this part)."""
        meta = self.read_meta()
        return bool(meta.get("validator") or meta.get("sha256"))


_guard = threading.Lock()
_in_progress: set[str] = set()


@contextlib.contextmanager
def _exclusive(folder: Path, name: str) -> Iterator[None]:
    """One download of a file at a time: in this process, and (where flock exists) across processes."""
    key = str(folder.resolve() / name)
    with _guard:
        if key in _in_progress:
            raise DownloadError(f"{name} is already being downloaded in this process: wait for that to finish.")
        _in_progress.add(key)
    try:
        with _file_lock(folder / f".{name}.lock", name):
            yield
    finally:
        with _guard:
            _in_progress.discard(key)


@contextlib.contextmanager
def _file_lock(path: Path, name: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: the in-process guard is all there is
        yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(
                f"Another process is downloading {name} into {path.parent} right now: wait for it to finish."
            ) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # only the holder removes it


# ---------------------------------------------------------------------------- progress


class _Reporter:
    """Feeds the progress bar and the caller's callback, the callback at most every PROGRESS_INTERVAL."""

    def __init__(self, name: str, total: int | None, start: int, callback: Progress | None, bar: bool) -> None:
        self.total = total
        self.callback = callback
        self.done = start
        self.last_call = 0.0
        self.bar = progress_bar(bar, total, name, "B", initial=start, in_bytes=True)
        self._call(force=True)

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        self._call(force=done == self.total)

    def _call(self, force: bool) -> None:
        now = time.monotonic()
        if self.callback is not None and (force or now - self.last_call >= PROGRESS_INTERVAL):
            self.last_call = now
            self.callback(self.done, self.total)

    def close(self) -> None:
        try:
            self._call(force=True)
        finally:
            self.bar.close()


# ---------------------------------------------------------------------------- downloading


def fetch(
    url: str,
    *,
    file_name: str | None = None,
    sha256: str | None = None,
    sha256_source: str = "given",
    folder: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    show_progress: bool = True,
    force: bool = False,
    timeout: float = TIMEOUT_SECONDS,
) -> Download:
    """Download ``url`` (http(s) or ``hf://owner/repo/file``) into the models folder.

    ``sha256``: the expected checksum (``sha256_source`` says where it came from, for messages);
    without one, Hugging Face's ``X-Linked-ETag`` is used when it is a SHA-256. ``progress`` is
    called with (bytes done, total or None); raising from it cancels (the partial file is kept).
    A file already there that passes the GGUF gate (and the checksum, when one is known) is not
    downloaded again unless ``force``. Every failure is a ``DownloadError`` saying what to do.
    """
    url = resolve_url(url)
    target_folder = Path(folder) if folder is not None else paths.models_dir()
    digest = normalize_sha256(sha256)
    expected = _Checksum(digest, sha256_source) if digest is not None else None
    name = safe_file_name(file_name, "the file name given", target_folder) if file_name is not None else None
    name = name or url_file_name(url, target_folder)
    try:
        target_folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"Cannot create the models folder {target_folder}: {error.strerror}. Set NBLLM_HOME to a writable folder."
        ) from error
    session = _Session(url, timeout)
    first: http.client.HTTPResponse | None = None
    try:
        if name is None:
            first = session.open()
            name = _disposition_name(first, url, target_folder)
        present = None if force else _already_present(target_folder / name, digest, url)
        if present is not None:
            return present
        with _exclusive(target_folder, name):
            return _transfer(session, first, target_folder, name, expected, progress, show_progress)
    finally:
        if first is not None:
            first.close()


def _already_present(target: Path, expected: str | None, url: str) -> Download | None:
    if not target.is_file():
        return None
    try:
        read_gguf(target)
    except InvalidModelFileError as error:
        log.warning("%s is there but not a valid model (%s): downloading it again.", target, error)
        return None
    digest = identity.file_sha256(target)  # remembered per file: hashed at most once
    if expected is not None and digest != expected:
        log.warning("%s is there but its SHA-256 differs from the expected one: downloading it again.", target)
        return None
    record = recorded_check(target)
    if expected is not None or record == (digest, True):
        how = "ok"
    elif record is not None and record[0] == digest:
        how = "not verified (no checksum known)"  # the same as when it arrived; nothing vouched for that
    else:
        how = "not recorded"
    return Download(target, digest, how, target.stat().st_size, url, already_present=True)


class _SplicedResume(Exception):
    """A resumed download failed its checksum: the kept part was of another version of the file."""


def _transfer(
    session: _Session,
    first: http.client.HTTPResponse | None,
    folder: Path,
    name: str,
    expected: _Checksum | None,
    progress: Progress | None,
    show_progress: bool,
) -> Download:
    partial = _Partial.of(folder, name)
    try:
        try:
            return _attempt(session, first, partial, folder, name, expected, progress, show_progress, resume=True)
        except _SplicedResume as spliced:
            log.warning("%s Downloading %s again from the start.", spliced, name)
            return _attempt(session, None, partial, folder, name, expected, progress, show_progress, resume=False)
    except BaseException:
        if not partial.size():
            partial.discard()  # a sidecar never outlives the bytes it describes (nor does an empty file)
        raise


def _attempt(
    session: _Session,
    first: http.client.HTTPResponse | None,
    partial: _Partial,
    folder: Path,
    name: str,
    expected: _Checksum | None,
    progress: Progress | None,
    show_progress: bool,
    *,
    resume: bool,
) -> Download:
    response, resumed = _start(session, partial, first, expected, resume)
    offset = resumed.offset if resumed else 0
    with contextlib.closing(response):
        length = _content_length(response)
        if length is None and resumed is not None:
            whole = _content_range(response)[1]
            length = whole - offset if whole is not None and whole >= offset else None
        total = offset + length if length is not None else None
        if length is not None:
            _check_space(folder, name, length, partial if offset else None)
        # The checksum the finished file must have: the caller's, Hugging Face's for this response,
        # or the one recorded with the kept part (whose sameness it then proves, at the end).
        linked = _Checksum(session.linked_sha256, "X-Linked-ETag") if session.linked_sha256 else None
        wanted = expected or linked or (resumed.checksum if resumed else None)
        validator = resumed.validator if resumed else _validator(response)
        try:
            partial.write_meta(session.url, validator, wanted, total)
        except OSError as error:
            raise _write_error(name, error, offset, None, partial) from None
        hasher = _hash_prefix(partial.data, offset)
        reporter = _Reporter(name, total, offset, progress, show_progress)
        try:
            done = _copy(response, partial, offset, hasher, reporter, total)
        finally:
            reporter.close()
    if total is not None and done < total:
        raise _cut_off(name, done, total, "the connection closed early", partial)
    if total is None:
        # Without a length, a connection closed early looks like the end: the GGUF file itself says
        # whether it is whole, before a checksum mismatch could delete a part worth resuming.
        _gate(name, partial, done, length_known=False)
    verified_by = _verify(name, hasher.hexdigest(), wanted, partial, resumed=offset > 0)
    if total is not None:
        _gate(name, partial, done, length_known=True)
    target = folder / name
    try:
        os.replace(partial.data, target)  # atomic: the model appears complete, or not at all
    except OSError as error:
        raise DownloadError(f"Cannot move the finished download into place as {target}: {error}.") from None
    partial.meta.unlink(missing_ok=True)
    digest = hasher.hexdigest()
    identity.remember(target, digest)
    record_checksum(target, digest, url=session.url, verified_by=verified_by)
    log.info("Downloaded %s (%s), SHA-256 %s", name, format_bytes(done), verified_by)
    return Download(target, digest, verified_by, done, session.url, resumed_from=offset)


def _start(
    session: _Session,
    partial: _Partial,
    first: http.client.HTTPResponse | None,
    expected: _Checksum | None,
    resume: bool,
) -> tuple[Any, _Resume | None]:
    """The response to read, and what was resumed (None: the response is the whole file).

    Resumes only where the server's file is proven to be the kept part's: see the module's doc.
    """
    kept = partial.resume_point(session.url) if resume else None
    if not resume:
        partial.discard()
    if kept is not None:
        why_not = _why_not_resume(kept, expected)
        if why_not:
            log.info("Not resuming %s: %s. Downloading it from the start.", partial.data.name, why_not)
            partial.discard()
            kept = None
    if kept is None:
        return (first if first is not None else session.open()), None
    if first is not None:
        first.close()  # opened without a Range; there is something to resume
    try:
        response = session.open(kept.offset, kept.validator)
    except _RangeNotSatisfiable:
        partial.discard()
        return session.open(), None
    if response.status == 206:
        why_not = _why_not_continue(response, kept, expected, session.linked_sha256)
        if why_not is None:
            log.info("Resuming %s at %s", partial.data.name, format_bytes(kept.offset))
            return response, kept
        log.info("Not resuming %s: %s. Downloading it from the start.", partial.data.name, why_not)
        response.close()
        partial.discard()
        return session.open(), None
    # 200: no range support, or If-Range saw new content. This response is the whole file.
    partial.discard()
    return response, None


def _why_not_resume(kept: _Resume, expected: _Checksum | None) -> str | None:
    """Why the kept part must not be resumed, judged before asking the server; None: ask."""
    if kept.checksum and expected and kept.checksum.sha256 != expected.sha256:
        return "the part kept is of a file with another checksum"
    if kept.validator is None and kept.checksum is None and expected is None:
        return (
            "the server sent no strong ETag or Last-Modified date and no checksum is known, so nothing "
            "could prove that its file is still the one the part kept came from"
        )
    return None


def _why_not_continue(
    response: http.client.HTTPResponse, kept: _Resume, expected: _Checksum | None, linked: str | None
) -> str | None:
    """Why a 206 must not be appended to the kept part; None when the file is proven the same
    (the validator echoed) or a checksum will prove it at the end."""
    start, whole = _content_range(response)
    if start != kept.offset:
        return f"the server continued at byte {start} instead of {kept.offset}"
    if kept.total is not None and whole is not None and whole != kept.total:
        return f"the file's size changed from {kept.total:,} to {whole:,} bytes"
    if kept.checksum and linked and linked != kept.checksum.sha256:
        return "its checksum (X-Linked-ETag) changed"
    if kept.validator is not None:
        echo = response.headers.get("ETag" if _is_etag(kept.validator) else "Last-Modified")
        if echo is not None and echo.strip() != kept.validator:
            return "the server's ETag or Last-Modified date changed"
        # A 206 must repeat the ETag it would send with a 200 (RFC 9110 15.3.7), so an ETag proves
        # sameness only when echoed; a date is not repeated, and the server's 206 under If-Range is its word.
        if echo is not None or not _is_etag(kept.validator):
            return None
    if kept.checksum or expected or linked:
        return None  # checked at the end; a mismatch then starts over
    return "the server did not confirm that its file is unchanged"


def _check_space(folder: Path, name: str, needed: int, kept: _Partial | None = None) -> None:
    free = shutil.disk_usage(folder).free
    if needed + SPACE_MARGIN > free:
        keeping = (
            f" The {format_bytes(kept.size())} downloaded so far are kept in {kept.data} for the next run."
            if kept is not None
            else ""
        )
        raise DownloadError(
            f"Not enough disk space for {name}: {format_bytes(needed)} to download, {format_bytes(free)} free in "
            f"{folder}. Free some space, or set NBLLM_HOME to a folder on a bigger disk.{keeping}"
        )


def _hash_prefix(path: Path, length: int) -> Any:
    """The running SHA-256, fed with the ``length`` bytes already on disk when resuming."""
    digest = hashlib.sha256()
    if length:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(block)
    return digest


def _write_all(handle: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        written = handle.write(view) or 0
        view = view[written:]


def _copy(
    response: http.client.HTTPResponse,
    partial: _Partial,
    offset: int,
    hasher: Any,
    report: _Reporter,
    total: int | None,
) -> int:
    done = offset
    name = partial.data.name.removeprefix(".").removesuffix(".partial")
    # Unbuffered: a full disk surfaces at the write that failed, and the file keeps a clean prefix.
    try:
        handle = open(partial.data, "ab" if offset else "wb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as error:
        raise _write_error(name, error, done, total, partial) from None
    with handle:
        while True:
            try:
                chunk = response.read1(CHUNK_BYTES)  # what has arrived: smooth progress, prompt cancel
            except (http.client.HTTPException, OSError) as error:
                raise _cut_off(name, done, total, str(error) or type(error).__name__, partial) from None
            if not chunk:
                break
            try:
                _write_all(handle, chunk)
            except OSError as error:
                raise _write_error(name, error, done, total, partial) from None
            hasher.update(chunk)
            done += len(chunk)
            report(done)
        try:
            os.fsync(handle.fileno())  # on disk before it is renamed into place
        except OSError as error:
            raise _write_error(name, error, done, total, partial) from None
    return done


def _of(total: int | None) -> str:
    return f" of {format_bytes(total)}" if total is not None else ""


def _how_to_resume(partial: _Partial) -> str:
    """What running the download again will do with the kept part, honestly."""
    if partial.resumable():
        return "run the same download again to resume from there."
    return (
        "run the same download again with its SHA-256 (--sha256; sha256= in Python) to resume from there. "
        "The server sends no strong ETag or Last-Modified date that would prove its file unchanged, so without "
        "a checksum the next run starts over."
    )


def _cut_off(name: str, done: int, total: int | None, why: str, partial: _Partial) -> DownloadError:
    return DownloadError(
        f"The download of {name} was cut off after {format_bytes(done)}{_of(total)} ({why}). The part downloaded "
        f"so far is kept in {partial.data}: {_how_to_resume(partial)}"
    )


def _write_error(name: str, error: OSError, done: int, total: int | None, partial: _Partial) -> DownloadError:
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        full = (
            f"The disk is full: writing {name} stopped after {format_bytes(done)}{_of(total)}. Free some space (or "
            "set NBLLM_HOME to a folder on a bigger disk)"
        )
        if not done:  # nothing written: nothing is kept (see _transfer)
            return DownloadError(f"{full}, then run the same download again.")
        return DownloadError(
            f"{full}; the part written is kept in {partial.data} (delete that file to get its space back). "
            f"Then {_how_to_resume(partial)}"
        )
    return DownloadError(f"Cannot write {partial.data}: {error.strerror or error}. Check the folder's permissions.")


def _verify(name: str, digest: str, wanted: _Checksum | None, partial: _Partial, *, resumed: bool) -> str:
    """Where the matching checksum came from; a mismatch deletes the file (and, after a resume,
    asks for one more download from the start: the kept part was of another version)."""
    if wanted is None:
        return "not verified (no checksum known)"
    if digest != wanted.sha256:
        partial.discard()
        if resumed:
            raise _SplicedResume(
                f"The resumed download of {name} does not match its SHA-256 ({wanted.source}): the part kept "
                "from before was of another version of the file."
            )
        raise DownloadError(
            f"Checksum mismatch for {name}: expected SHA-256 {wanted.sha256} ({wanted.source}), got {digest}. The "
            "downloaded file was deleted. Download it again; if this repeats, the file on the server is not the "
            "expected one (the catalog entry may be outdated)."
        )
    return f"verified ({wanted.source})"


def _gate(name: str, partial: _Partial, done: int, *, length_known: bool) -> None:
    try:
        read_gguf(partial.data)
    except InvalidModelFileError as error:
        if not length_known and _starts_like_gguf(partial.data):
            # The server never said how long the file is, and the GGUF file is not whole: cut off,
            # most likely, not a wrong file. Kept for a resume (which must prove the file unchanged).
            why = "the server did not say how long the file is, and the GGUF file is incomplete"
            raise _cut_off(name, done, None, why, partial) from None
        partial.discard()
        raise DownloadError(
            f"The download of {name} is complete but is not a usable GGUF model, so it was deleted: {error} "
            "Check the URL: it may point to a web page or another kind of file."
        ) from None


def _starts_like_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False
