"""Downloads that cannot splice (issue 13, item 4), against a real HTTP server on 127.0.0.1.

A server that cuts a download and then changes the file must never get the rest of the new file
appended to the part of the old one: a resume is used only when the server proves its file is the
same (a strong ETag or an old-enough Last-Modified sent back with If-Range and confirmed) or a known
checksum is checked at the end. ``verify`` says "no checksum known" when nothing vouched for a file;
no sidecar outlives its partial file; and a cut without a Content-Length keeps the part for a resume.

The two "versions" of a file are tiny models of the same shape with different weights, so a splice
of them is a valid GGUF file of the right size: only the bytes can tell.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbllm.core.errors import DownloadError
from nbllm.core.gguf_file import read_gguf
from nbllm.hub import manager
from nbllm.hub.downloads import fetch, load_checksums
from nbllm.testing import make_tiny_model
from tests.test_download import ModelServer, Route, _Handler

OLD_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"  # long before any response's Date: a strong validator


class _ValidatingHandler(_Handler):
    """``ModelServer``'s handler, but If-Range also matches a Last-Modified date, and the server
    can be told to ignore If-Range altogether (a careless server that honours only Range)."""

    def _range(self, route: Route) -> tuple[int, int]:
        server: ValidatingServer = self.server.model_server  # type: ignore[attr-defined]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if not match or not route.ranges:
            return 0, 200
        if_range = self.headers.get("If-Range")
        current = (route.headers.get("ETag"), route.headers.get("Last-Modified"))
        if if_range and not server.ignore_if_range and if_range not in current:
            return 0, 200  # the content changed: the whole new file
        start = int(match.group(1))
        return (start, 206) if start < len(route.body) else (0, 416)


class ValidatingServer(ModelServer):
    def __init__(self) -> None:
        super().__init__()
        self.ignore_if_range = False
        self.httpd.RequestHandlerClass = _ValidatingHandler


@pytest.fixture
def server() -> Iterator[ValidatingServer]:
    httpd = ValidatingServer()
    yield httpd
    httpd.close()


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """Two versions of one file: the same size and header layout, different weights."""
    folder = tmp_path_factory.mktemp("versions")
    old = make_tiny_model(folder / "old.gguf", seed=11).read_bytes()
    new = make_tiny_model(folder / "new.gguf", seed=21).read_bytes()
    assert len(old) == len(new)
    assert old != new
    return old, new


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def cut_then_change(
    server: ValidatingServer,
    old: bytes,
    new: bytes,
    headers: dict[str, str] | None = None,
    new_headers: dict[str, str] | None = None,
    **options: Any,
) -> str:
    """Serve ``old`` cut off halfway, fetch it (cut), then put ``new`` in its place (with
    ``new_headers``, by default the same headers: a server that does not notice the change)."""
    headers = headers or {}
    url = server.serve("/m.gguf", old, headers=dict(headers), cut_after=len(old) // 2, **options)
    with pytest.raises(DownloadError, match="cut off"):
        fetch(url, show_progress=False)
    server.serve("/m.gguf", new, headers=dict(headers if new_headers is None else new_headers), **options)
    return url


# ---------------------------------------------------------------------------- the splice


def test_the_splice_of_two_versions_is_a_valid_gguf_file_so_only_the_bytes_can_tell(
    versions: tuple[bytes, bytes], tmp_path: Path
) -> None:
    old, new = versions
    half = len(old) // 2
    splice = tmp_path / "splice.gguf"
    splice.write_bytes(old[:half] + new[half:])
    assert read_gguf(splice).architecture == "llama"  # why the gate alone cannot catch it


def test_a_file_changed_on_a_server_without_validators_is_downloaded_whole_never_spliced(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, new = versions
    url = cut_then_change(server, old, new)
    models = home / "models"
    assert (models / ".m.gguf.partial").stat().st_size == len(old) // 2  # kept: a checksum could prove it

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert result.resumed_from == 0
    assert "Range" not in server.requests_to("/m.gguf")[-1]  # nothing proved the file unchanged
    assert result.verified_by == "not verified (no checksum known)"
    assert leftovers(models) == []


def test_the_cut_message_says_a_resume_needs_a_checksum_when_the_server_sends_no_validator(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    url = server.serve("/m.gguf", versions[0], cut_after=1000)
    with pytest.raises(DownloadError, match=r"--sha256.*without a checksum the next run starts over"):
        fetch(url, show_progress=False)


def test_a_strong_etag_sent_back_with_if_range_resumes_to_the_exact_file(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, _ = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, headers={"ETag": '"v1"'}, cut_after=half)
    with pytest.raises(DownloadError, match=r"cut off .*run the same download again to resume from there\."):
        fetch(url, show_progress=False)

    result = fetch(url, show_progress=False)

    assert result.resumed_from == half
    assert result.path.read_bytes() == old
    last = server.requests_to("/m.gguf")[-1]
    assert (last["Range"], last["If-Range"]) == (f"bytes={half}-", '"v1"')


def test_a_changed_strong_etag_makes_the_download_start_over(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, new = versions
    url = cut_then_change(server, old, new, headers={"ETag": '"v1"'}, new_headers={"ETag": '"v2"'})

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert result.resumed_from == 0


def test_a_weak_etag_is_never_trusted_for_if_range(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    # A weak ETag only promises an "equivalent" file: this server keeps it across the change.
    old, new = versions
    url = cut_then_change(server, old, new, headers={"ETag": 'W/"same"'})

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert all("W/" not in headers.get("If-Range", "") for headers in server.requests_to("/m.gguf"))
    assert "Range" not in server.requests_to("/m.gguf")[-1]


def test_an_old_last_modified_date_sent_back_with_if_range_resumes_and_a_new_one_starts_over(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, new = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, headers={"Last-Modified": OLD_DATE}, cut_after=half)
    with pytest.raises(DownloadError, match="cut off"):
        fetch(url, show_progress=False)
    resumed = fetch(url, show_progress=False)
    assert resumed.resumed_from == half
    assert resumed.path.read_bytes() == old
    assert server.requests_to("/m.gguf")[-1]["If-Range"] == OLD_DATE

    resumed.path.unlink()
    url = cut_then_change(
        server, old, new, headers={"Last-Modified": OLD_DATE}, new_headers={"Last-Modified": email.utils.formatdate()}
    )
    again = fetch(url, show_progress=False)
    assert again.path.read_bytes() == new
    assert again.resumed_from == 0


def test_a_last_modified_date_as_new_as_the_response_is_not_trusted(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    # Dates have one-second resolution: a file changed within the second keeps its date, so a date
    # is a strong validator only well before the response's Date (RFC 9110 8.8.2.2).
    old, new = versions
    now = email.utils.formatdate(usegmt=True)
    url = cut_then_change(server, old, new, headers={"Last-Modified": now})

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert "If-Range" not in server.requests_to("/m.gguf")[-1]


def test_a_server_that_ignores_if_range_and_drops_its_etag_is_not_spliced(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    # A 206 must repeat the ETag (RFC 9110 15.3.7): without it, nothing confirms the file is the same.
    old, new = versions
    url = cut_then_change(server, old, new, headers={"ETag": '"v1"'}, new_headers={})
    server.ignore_if_range = True

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new


def test_a_changed_x_linked_etag_makes_the_download_start_over_and_verify(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    # Hugging Face's checksum is remembered with the part kept; a new one on the rerun means a new file.
    old, new = versions
    url = cut_then_change(
        server, old, new, headers={"X-Linked-ETag": f'"{sha(old)}"'}, new_headers={"X-Linked-ETag": f'"{sha(new)}"'}
    )

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert result.verified_by == "verified (X-Linked-ETag)"


def test_an_unchanged_x_linked_etag_lets_a_server_without_validators_resume(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, _ = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, headers={"X-Linked-ETag": f'"{sha(old)}"'}, cut_after=half)
    with pytest.raises(DownloadError, match=r"run the same download again to resume from there\."):
        fetch(url, show_progress=False)

    result = fetch(url, show_progress=False)

    assert result.resumed_from == half
    assert result.path.read_bytes() == old
    assert result.verified_by == "verified (X-Linked-ETag)"


def test_a_known_checksum_lets_a_resume_happen_and_a_spliced_result_is_downloaded_again_whole(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    # A stale mirror served the old file for a download that expects the new one; by the rerun it
    # serves the new one. The resume is checked by the checksum, fails, and starts over by itself.
    old, new = versions
    url = server.serve("/m.gguf", old, cut_after=len(old) // 2)
    with pytest.raises(DownloadError, match="cut off"):
        fetch(url, sha256=sha(new), show_progress=False)
    server.serve("/m.gguf", new)

    result = fetch(url, sha256=sha(new), show_progress=False)

    assert result.path.read_bytes() == new
    assert result.resumed_from == 0
    assert result.verified_by == "verified (given)"
    ranges = [h.get("Range") for h in server.requests_to("/m.gguf")]
    assert ranges == [None, f"bytes={len(old) // 2}-", None]  # tried, failed the checksum, started over
    assert leftovers(home / "models") == []


def test_a_known_checksum_resumes_an_unchanged_file_from_a_server_without_validators(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, _ = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, cut_after=half)
    with pytest.raises(DownloadError, match="cut off"):
        fetch(url, show_progress=False)

    result = fetch(url, sha256=sha(old), sha256_source="catalog", show_progress=False)

    assert result.resumed_from == half
    assert result.path.read_bytes() == old
    assert result.verified_by == "verified (catalog)"


# ---------------------------------------------------------------------------- verify


def run_verify_cli(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbllm.cli", "models", "verify", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "NBLLM_HOME": str(home)},
        timeout=300,
    )


def test_verify_of_a_download_nothing_verified_says_no_checksum_known_not_ok(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    url = server.serve("/m.gguf", versions[0])
    fetch(url, show_progress=False)
    assert load_checksums()["m.gguf"]["verified_by"] == "not verified (no checksum known)"

    report = manager.verify()
    checksum = report[0]["checksum"]
    assert "no checksum known" in checksum
    assert not checksum.startswith("ok")
    assert "no checksum known" in (report.title or "")

    cli = run_verify_cli(home)
    assert cli.returncode == 0, cli.stderr  # nothing found wrong: the GGUF check passed
    row = next(line for line in cli.stdout.splitlines() if line.startswith("m.gguf"))
    assert "unknown (no checksum known" in row
    assert row.count("ok (") == 1  # the GGUF column's "ok (llama, F32)"; no checksum "ok (...)"

    again = fetch(url, show_progress=False)  # already there: the same honesty
    assert again.already_present
    assert again.verified_by == "not verified (no checksum known)"


def test_verify_still_catches_a_change_to_a_download_nothing_verified(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    url = server.serve("/m.gguf", versions[0])
    path = fetch(url, show_progress=False).path
    path.write_bytes(versions[1])  # same size, other bytes

    report = manager.verify()

    assert not report.ok
    assert report[0]["checksum"].startswith("MISMATCH (changed since its download)")
    assert run_verify_cli(home).returncode == 1


def test_verify_of_a_verified_download_still_says_ok(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    url = server.serve("/m.gguf", versions[0])
    fetch(url, sha256=sha(versions[0]), show_progress=False)
    assert manager.verify()[0]["checksum"] == "ok (recorded at download)"


# ---------------------------------------------------------------------------- sidecars


class Disk:
    """A folder on a small disk whose size a test can change: a real tmpfs where mounting is
    allowed (as root), else the downloader's free-space probe (``shutil.disk_usage``) faked."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.size = folder, 16 * 2**20
        self.real = self._mount("mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(folder))
        if not self.real:
            monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=self.size))

    def resize(self, size: int) -> None:
        self.size = size
        if self.real:
            assert self._mount("mount", "-o", f"remount,size={size}", str(self.folder))

    @staticmethod
    def _mount(*command: str) -> bool:
        if shutil.which("mount") is None:
            return False
        try:
            return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    folder = tmp_path / "disk"
    folder.mkdir()
    small = Disk(folder, monkeypatch)
    yield small
    if small.real:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)


def test_a_disk_space_refusal_leaves_no_sidecar_behind(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes], disk: Disk
) -> None:
    url = server.serve("/m.gguf", versions[0], headers={"ETag": '"v1"'})
    disk.resize(2**20)  # less than the file and the margin kept free

    with pytest.raises(DownloadError, match=r"Not enough disk space for m\.gguf"):
        fetch(url, folder=disk.folder, show_progress=False)

    assert leftovers(disk.folder) == []  # no .m.gguf.partial.json, no lock, no empty partial


def test_a_disk_space_refusal_on_a_resume_keeps_the_part_with_its_sidecar_for_later(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes], disk: Disk
) -> None:
    old, _ = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, headers={"ETag": '"v1"'}, cut_after=half)
    with pytest.raises(DownloadError, match="cut off"):
        fetch(url, folder=disk.folder, show_progress=False)
    disk.resize(2**20)
    with pytest.raises(DownloadError, match=r"Not enough disk space .* kept in .*\.m\.gguf\.partial"):
        fetch(url, folder=disk.folder, show_progress=False)
    assert leftovers(disk.folder) == [".m.gguf.partial", ".m.gguf.partial.json"]
    disk.resize(16 * 2**20)  # space freed

    result = fetch(url, folder=disk.folder, show_progress=False)

    assert result.resumed_from == half
    assert result.path.read_bytes() == old


def test_a_download_cancelled_before_its_first_byte_leaves_nothing_behind(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    url = server.serve("/m.gguf", versions[0], headers={"ETag": '"v1"'})

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int | None) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        fetch(url, progress=cancel, show_progress=False)

    assert leftovers(home / "models") == []


# ---------------------------------------------------------------------------- no Content-Length


def test_a_cut_download_without_content_length_is_kept_and_resumed_when_proven_the_same(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, _ = versions
    half = len(old) // 2
    url = server.serve("/m.gguf", old, headers={"ETag": '"v1"'}, send_length=False, cut_after=half)

    with pytest.raises(DownloadError, match=r"cut off after .*did not say how long .*resume from there\."):
        fetch(url, show_progress=False)
    models = home / "models"
    assert (models / ".m.gguf.partial").stat().st_size == half
    assert not (models / "m.gguf").exists()

    result = fetch(url, show_progress=False)

    assert result.resumed_from == half
    assert result.path.read_bytes() == old
    assert server.requests_to("/m.gguf")[-1]["If-Range"] == '"v1"'
    assert leftovers(models) == []


def test_a_cut_download_without_content_length_or_validator_is_kept_but_not_resumed_after_a_change(
    home: Path, server: ValidatingServer, versions: tuple[bytes, bytes]
) -> None:
    old, new = versions
    url = cut_then_change(server, old, new, send_length=False)
    assert (home / "models" / ".m.gguf.partial").stat().st_size == len(old) // 2

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == new
    assert result.resumed_from == 0
    assert "Range" not in server.requests_to("/m.gguf")[-1]


def test_a_file_without_content_length_that_is_not_gguf_is_still_deleted(home: Path, server: ValidatingServer) -> None:
    url = server.serve("/m.gguf", b"<html><body>Please log in</body></html>" * 10, send_length=False)
    with pytest.raises(DownloadError, match=r"not a usable GGUF model, so it was deleted"):
        fetch(url, show_progress=False)
    assert leftovers(home / "models") == []
