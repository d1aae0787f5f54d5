"""The downloader against a real HTTP server on 127.0.0.1 serving real (tiny, generated) GGUF files.

The server (``ModelServer``, also used by the manager and panel tests) supports Range requests
and If-Range, and can be told to cut a response off, ignore ranges, fail with a status, redirect
like Hugging Face, send X-Linked-ETag or Content-Disposition headers, or send slowly. Nothing here
touches the internet.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from nbllm.core import identity
from nbllm.core.errors import DownloadError
from nbllm.core.gguf_file import read_gguf
from nbllm.hub import downloads as downloader
from nbllm.hub.downloads import fetch, load_checksums, resolve_url
from nbllm.testing import make_tiny_model

# ---------------------------------------------------------------------------- the test server


@dataclass
class Route:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # close the connection after this many body bytes, once
    ranges: bool = True  # honour Range requests (False: always 200 with the whole body)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    redirect: str | None = None
    delay: float = 0.0  # seconds to wait before each 16 KiB piece


class ModelServer:
    """An HTTP server in a thread, on a free port of 127.0.0.1, serving ``routes`` by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.model_server = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, **options: Any) -> str:
        self.routes[path] = Route(body, **options)
        return self.base + path

    def requests_to(self, path: str) -> list[dict[str, str]]:
        return [headers for raw, headers in self.requests if urlsplit(raw).path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet test output

    def do_GET(self) -> None:
        server: ModelServer = self.server.model_server  # type: ignore[attr-defined]
        server.requests.append((self.path, dict(self.headers)))
        route = server.routes.get(urlsplit(self.path).path)
        if route is None:
            return self._empty(404, "Not Found")
        if route.redirect:
            return self._empty(302, "Found", {"Location": route.redirect, **route.headers})
        if route.status != 200:
            return self._empty(route.status, "Scripted Failure")
        start, status = self._range(route)
        if status == 416:
            return self._empty(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(route.body)}"})
        payload = route.body[start:]
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        for key, value in route.headers.items():
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        if route.send_length:
            self.send_header("Content-Length", str(len(payload)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if route.cut_after is not None:
            payload, route.cut_after = payload[: route.cut_after], None
            self.close_connection = True
        self._write(payload, route.delay)

    def _range(self, route: Route) -> tuple[int, int]:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if not match or not route.ranges:
            return 0, 200
        if_range = self.headers.get("If-Range")
        if if_range and if_range != route.headers.get("ETag"):
            return 0, 200  # the content changed: the whole new file
        start = int(match.group(1))
        return (start, 206) if start < len(route.body) else (0, 416)

    def _write(self, payload: bytes, delay: float) -> None:
        try:
            for offset in range(0, len(payload), 16384):
                if delay:
                    time.sleep(delay)
                self.wfile.write(payload[offset : offset + 16384])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a cancelled download)

    def _empty(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status, reason)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def server() -> Iterator[ModelServer]:
    httpd = ModelServer()
    yield httpd
    httpd.close()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("served")
    return {
        "a": make_tiny_model(folder / "a.gguf", seed=11).read_bytes(),
        "b": make_tiny_model(folder / "b.gguf", seed=12, n_layer=3).read_bytes(),
        # Larger than the 1 MiB disk of the disk-full tests.
        "big": make_tiny_model(folder / "big.gguf", seed=13, n_embd=256, n_head=4, n_head_kv=4).read_bytes(),
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


# ---------------------------------------------------------------------------- complete downloads


def test_a_complete_download_is_verified_recorded_and_moved_into_the_models_folder(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/files/tiny.gguf", model_bytes["a"], headers={"ETag": '"v1"'})
    seen: list[tuple[int, int | None]] = []

    result = fetch(url, sha256=sha(model_bytes["a"]), progress=lambda done, total: seen.append((done, total)))

    target = home / "models" / "tiny.gguf"
    assert result.path == target
    assert target.read_bytes() == model_bytes["a"]
    assert result.sha256 == sha(model_bytes["a"])
    assert result.verified_by == "verified (given)"
    assert read_gguf(target).architecture == "llama"
    assert identity.file_sha256(target) == result.sha256  # remembered, not re-hashed
    assert load_checksums()["tiny.gguf"]["sha256"] == result.sha256
    assert seen[-1] == (len(model_bytes["a"]), len(model_bytes["a"]))
    assert leftovers(home / "models") == []  # no partial file, sidecar or lock left behind


def test_the_terminal_progress_bar_runs_without_a_callback(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"])
    fetch(url, show_progress=True)
    assert "tiny.gguf" in capsys.readouterr().err


def test_a_file_already_there_is_not_downloaded_again(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"])
    fetch(url, show_progress=False)
    again = fetch(url, sha256=sha(model_bytes["a"]), show_progress=False)
    assert again.already_present
    assert len(server.requests_to("/tiny.gguf")) == 1
    forced = fetch(url, show_progress=False, force=True)
    assert not forced.already_present
    assert len(server.requests_to("/tiny.gguf")) == 2


def test_a_file_whose_name_the_server_suggests_is_saved_under_that_name(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve(
        "/download", model_bytes["a"], headers={"Content-Disposition": "attachment; filename*=UTF-8''suggested.gguf"}
    )
    result = fetch(url + "?id=7", show_progress=False)
    assert result.path == home / "models" / "suggested.gguf"


# ---------------------------------------------------------------------------- resuming


def test_a_download_cut_off_halfway_resumes_from_where_it_stopped(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    data = model_bytes["a"]
    half = len(data) // 2
    url = server.serve("/tiny.gguf", data, headers={"ETag": '"v1"'}, cut_after=half)
    models = home / "models"

    with pytest.raises(DownloadError, match=r"cut off after .* run the same download again to resume"):
        fetch(url, sha256=sha(data), show_progress=False)
    assert not (models / "tiny.gguf").exists()  # a half file is never seen as a model
    assert (models / ".tiny.gguf.partial").stat().st_size == half

    result = fetch(url, sha256=sha(data), show_progress=False)

    assert result.resumed_from == half
    assert (models / "tiny.gguf").read_bytes() == data
    second = server.requests_to("/tiny.gguf")[-1]
    assert second["Range"] == f"bytes={half}-"
    assert second["If-Range"] == '"v1"'
    assert leftovers(models) == []


def test_a_server_that_answers_200_to_a_range_request_makes_the_download_start_over(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    data = model_bytes["a"]
    url = server.serve("/tiny.gguf", data, cut_after=1000, ranges=False)
    with pytest.raises(DownloadError, match=r"cut off"):
        fetch(url, show_progress=False)

    result = fetch(url, sha256=sha(data), show_progress=False)

    assert result.resumed_from == 0
    assert result.path.read_bytes() == data  # not 1000 stale bytes followed by the whole file


def test_a_file_that_changed_on_the_server_is_downloaded_again_from_the_start(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"], headers={"ETag": '"v1"'}, cut_after=5000)
    with pytest.raises(DownloadError):
        fetch(url, show_progress=False)
    server.serve("/tiny.gguf", model_bytes["b"], headers={"ETag": '"v2"'})  # a new upload

    result = fetch(url, show_progress=False)

    assert result.path.read_bytes() == model_bytes["b"]
    assert result.resumed_from == 0


def test_a_partial_file_from_another_url_is_never_appended_to(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    first = server.serve("/mirror-a/tiny.gguf", model_bytes["a"], cut_after=3000)
    with pytest.raises(DownloadError):
        fetch(first, show_progress=False)
    second = server.serve("/mirror-b/tiny.gguf", model_bytes["b"])

    result = fetch(second, show_progress=False)

    assert "Range" not in server.requests_to("/mirror-b/tiny.gguf")[0]
    assert result.path.read_bytes() == model_bytes["b"]


def test_a_partial_file_without_its_sidecar_is_discarded(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    models = home / "models"
    models.mkdir(parents=True)
    (models / ".tiny.gguf.partial").write_bytes(b"bytes of unknown origin")
    url = server.serve("/tiny.gguf", model_bytes["a"])

    result = fetch(url, show_progress=False)

    assert "Range" not in server.requests_to("/tiny.gguf")[0]
    assert result.path.read_bytes() == model_bytes["a"]


# ---------------------------------------------------------------------------- checksums


def test_a_wrong_checksum_removes_the_file_and_names_both_checksums(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"])
    wrong = "0" * 64

    with pytest.raises(DownloadError) as caught:
        fetch(url, sha256=wrong, show_progress=False)

    message = str(caught.value)
    assert "Checksum mismatch for tiny.gguf" in message
    assert wrong in message
    assert sha(model_bytes["a"]) in message
    assert "deleted" in message
    assert not (home / "models" / "tiny.gguf").exists()
    assert leftovers(home / "models") == []


def test_hugging_faces_x_linked_etag_verifies_a_download(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    data = model_bytes["a"]
    url = server.serve("/tiny.gguf", data, headers={"X-Linked-ETag": f'"{sha(data)}"'})

    result = fetch(url, show_progress=False)

    assert result.verified_by == "verified (X-Linked-ETag)"
    assert load_checksums()["tiny.gguf"]["verified_by"] == "verified (X-Linked-ETag)"


def test_a_wrong_x_linked_etag_on_a_redirect_fails_the_download_like_a_wrong_checksum(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    # Like Hugging Face: /resolve/ redirects to the CDN, and the checksum is on the redirect.
    server.serve("/cdn/tiny.gguf", model_bytes["a"])
    url = server.serve(
        "/org/repo/resolve/main/tiny.gguf",
        b"",
        redirect=server.base + "/cdn/tiny.gguf",
        headers={"X-Linked-Etag": f'"{sha(model_bytes["b"])}"'},
    )
    with pytest.raises(DownloadError, match=r"Checksum mismatch .*X-Linked-ETag"):
        fetch(url, show_progress=False)

    server.routes["/org/repo/resolve/main/tiny.gguf"].headers["X-Linked-Etag"] = f'"{sha(model_bytes["a"])}"'
    assert fetch(url, show_progress=False).verified_by == "verified (X-Linked-ETag)"


def test_an_x_linked_etag_that_is_not_a_sha256_is_ignored(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"], headers={"X-Linked-ETag": '"abc123"'})
    assert fetch(url, show_progress=False).verified_by == "not verified (no checksum known)"


def test_a_downloaded_file_that_is_not_gguf_is_rejected_and_removed(home: Path, server: ModelServer) -> None:
    url = server.serve("/model.gguf", b"<html><body>Please log in</body></html>" * 10)
    with pytest.raises(DownloadError, match=r"not a usable GGUF model"):
        fetch(url, show_progress=False)
    assert not (home / "models" / "model.gguf").exists()
    assert leftovers(home / "models") == []


def test_a_malformed_expected_checksum_is_refused_before_downloading(home: Path, server: ModelServer) -> None:
    url = server.serve("/tiny.gguf", b"")
    with pytest.raises(DownloadError, match=r"64 hexadecimal"):
        fetch(url, sha256="not-a-checksum")
    assert server.requests == []


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "words"),
    [(404, "HTTP 404 .*no file at that address"), (500, "HTTP 500 .*error on its side"), (503, "HTTP 503")],
)
def test_http_errors_say_which_status_and_what_to_do(home: Path, server: ModelServer, status: int, words: str) -> None:
    url = server.serve("/tiny.gguf", b"", status=status) if status != 404 else server.base + "/missing.gguf"
    with pytest.raises(DownloadError, match=words):
        fetch(url, show_progress=False)
    assert not (home / "models" / "tiny.gguf").exists()


def test_no_network_is_a_clear_error(home: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=r"cannot reach 127\.0\.0\.1 \(connection refused.*Check the network"):
        fetch(f"http://127.0.0.1:{port}/tiny.gguf", show_progress=False)


def test_a_name_that_does_not_resolve_says_so() -> None:
    error = downloader._network_error("https://models.example.invalid/m.gguf", socket.gaierror(-2, "Name not known"))
    assert "the host name models.example.invalid could not be resolved: no network, or no DNS" in str(error)


@pytest.mark.parametrize(
    "source",
    [
        "ftp://example.org/model.gguf",
        "file:///etc/passwd",
        "model.gguf",
        "hf://only",
        "hf://../../etc/passwd",  # would climb out of the endpoint's repository paths
        "hf://Org/Repo/../../other/m.gguf",
    ],
)
def test_sources_that_are_not_http_or_hf_are_refused(home: Path, source: str) -> None:
    with pytest.raises(DownloadError):
        fetch(source, show_progress=False)


def test_hf_urls_go_to_the_endpoint_from_the_environment(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBLLM_HF_ENDPOINT", server.base + "/")
    assert (
        resolve_url("hf://Org/Repo-GGUF/sub dir/m.gguf") == f"{server.base}/Org/Repo-GGUF/resolve/main/sub%20dir/m.gguf"
    )
    server.serve("/Org/Repo-GGUF/resolve/main/m.gguf", model_bytes["a"])

    result = fetch("hf://Org/Repo-GGUF/m.gguf", show_progress=False)

    assert result.path.name == "m.gguf"


def test_the_default_hugging_face_endpoint_is_huggingface_co(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBLLM_HF_ENDPOINT", raising=False)
    assert resolve_url("hf://TheBloke/phi-2-GGUF/phi-2.Q4_K_M.gguf") == (
        "https://huggingface.co/TheBloke/phi-2-GGUF/resolve/main/phi-2.Q4_K_M.gguf"
    )


# ---------------------------------------------------------------------------- names that would escape


@pytest.mark.parametrize(
    "name",
    ["../evil.gguf", "../../tmp/evil.gguf", "/tmp/evil.gguf", "sub/evil.gguf", "..\\evil.gguf", ".hidden.gguf",
     "evil.txt", "C:evil.gguf", ""],
)  # fmt: skip
def test_file_names_that_would_escape_or_hide_in_the_models_folder_are_refused(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes], name: str
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"])
    with pytest.raises(DownloadError, match=r"Refusing to save a download"):
        fetch(url, file_name=name, show_progress=False)
    assert server.requests == []  # refused before anything was fetched
    assert not (home / "evil.gguf").exists()


def test_a_url_whose_last_part_decodes_to_a_path_is_refused(home: Path, server: ModelServer) -> None:
    with pytest.raises(DownloadError, match=r"path separator"):
        fetch(server.base + "/files/..%2F..%2Fevil.gguf", show_progress=False)


def test_a_server_suggested_name_with_a_path_is_refused(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve(
        "/download", model_bytes["a"], headers={"Content-Disposition": 'attachment; filename="../../evil.gguf"'}
    )
    with pytest.raises(DownloadError, match=r"Refusing .*Content-Disposition"):
        fetch(url, show_progress=False)
    assert not list(home.parent.rglob("evil.gguf"))


def test_a_url_without_a_file_name_needs_one(home: Path, server: ModelServer, model_bytes: dict[str, bytes]) -> None:
    url = server.serve("/download", model_bytes["a"])
    with pytest.raises(DownloadError, match=r"file_name="):
        fetch(url, show_progress=False)


# ---------------------------------------------------------------------------- full disks


def _mount_tmpfs(folder: Path) -> bool:
    if shutil.which("mount") is None:
        return False
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a 1 MiB disk: a real tmpfs where mounting is allowed (as root), else the same
    limit simulated at the downloader's disk-usage and write calls."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if _mount_tmpfs(folder):
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)
        return
    limit = 2**20
    monkeypatch.setattr(downloader.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=limit, free=limit))
    written = [0]
    real_write = downloader._write_all

    def write_until_full(handle: Any, chunk: bytes) -> None:
        if written[0] + len(chunk) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(chunk)
        real_write(handle, chunk)

    monkeypatch.setattr(downloader, "_write_all", write_until_full)
    yield folder


def test_a_download_larger_than_the_free_space_is_refused_before_it_starts(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes], small_disk: Path
) -> None:
    url = server.serve("/big.gguf", model_bytes["big"])
    with pytest.raises(DownloadError, match=r"Not enough disk space for big.gguf: .* free in") as caught:
        fetch(url, folder=small_disk, show_progress=False)
    assert "NBLLM_HOME" in str(caught.value)
    assert not (small_disk / "big.gguf").exists()
    assert not (small_disk / ".big.gguf.partial").exists() or (small_disk / ".big.gguf.partial").stat().st_size == 0


def test_a_disk_that_fills_up_while_writing_keeps_the_part_and_says_how_to_resume(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes], small_disk: Path
) -> None:
    # Without a Content-Length nothing can be checked up front: the write itself fails.
    url = server.serve("/big.gguf", model_bytes["big"], send_length=False)
    with pytest.raises(DownloadError, match=r"The disk is full: writing big.gguf stopped after") as caught:
        fetch(url, folder=small_disk, show_progress=False)
    assert "run the same download again" in str(caught.value)
    assert not (small_disk / "big.gguf").exists()


# ---------------------------------------------------------------------------- the checksum record


def test_checksums_are_recorded_in_a_json_sidecar_of_the_models_folder(
    home: Path, server: ModelServer, model_bytes: dict[str, bytes]
) -> None:
    url = server.serve("/tiny.gguf", model_bytes["a"])
    fetch(url, show_progress=False)
    record = json.loads((home / "models" / "checksums.json").read_text())
    assert record["tiny.gguf"]["sha256"] == sha(model_bytes["a"])
    assert record["tiny.gguf"]["url"] == url
    assert record["tiny.gguf"]["size"] == len(model_bytes["a"])
