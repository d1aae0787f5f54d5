"""The prompt cache: finished answers memoized on disk with ``joblib.Memory``, stored as signed JSON.

An identical request — same model *file* (by content hash), same prompt or messages, same
parameters including the seed, same context size, same backend version, same cache format —
returns the stored answer without touching the model. Only answers that ended normally are
stored: interrupted, stopped or failed generations never are.

Storage is joblib's: one folder per entry, named by a hash of the request, written to a
temporary name and renamed into place, so two kernels sharing the folder never see half an
entry; the least recently *accessed* entries are dropped first when the cache is trimmed. Most
Linux filesystems update access times lazily (relatime), so a hit touches its entry explicitly
to keep the order truly LRU.

What is read is never trusted. joblib pickles, and loading a pickle runs whatever code the file
names: anyone who could write one file in the folder could run code in every kernel that asked
the matching question. So joblib's file store is kept, through a store backend of our own, but
its serialization is replaced:

- an entry is JSON (``json`` builds dicts, lists, strings and numbers, and runs nothing),
  preceded by an HMAC-SHA256 of the JSON and of the request it answers, under a per-user key
  (``prompt-cache.key`` in nbllm's cache folder, 0600, made once). The signature is checked
  before the JSON is parsed, so an entry written by anyone without the key — changed since,
  copied from another request, or another user's — is never parsed at all;
- the parsed answer must have exactly the fields and types this module writes (pieces a list of
  strings, counts non-negative ints...): the pipeline then never meets a wrong type;
- any entry that fails — damaged, half written, foreign, tampered, of another shape, a link, a
  pipe, too large — is a miss, logged once, and removed;
- every folder created here is 0700 and every file 0600, whatever the umask;
- joblib's ``metadata.json`` is not written: it holds the call's arguments — the whole prompt —
  as text, for joblib's verbose messages only. The folder holds answers, never prompts.

The file holding an entry keeps joblib's name, ``output.pkl``: joblib's store finds entries and
trims them by that name, whatever the file holds.

Format 1 entries were pickles: they are never read (format 2 lives under another joblib function
name, and the format is part of every key), and their folder is deleted when the cache is opened.

Faults turn into misses, never crashes; a folder that cannot be written, or a key that cannot be
made, turns the cache off with one warning.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

from nbllm.core import paths

log = logging.getLogger("nbllm")

# 3: answers record the schema they had to fit (structured output); older entries are misses.
# 4: and the max_tokens they were asked with (a cut by a full context is told apart from it).
# 5: and the tokens speculative decoding drafted and kept.
CACHE_FORMAT = 5
_FORMAT_1_FUNC = ("nbllm", "core", "prompt_cache", "_cached_answer")  # pickles: deleted, never read
_BACKEND_NAME = "nbllm-signed-json"
_ITEM_FILE = "output.pkl"  # joblib's name for an entry's file (see the module's docstring)
_MAGIC = b"nbllm-prompt-cache %d " % CACHE_FORMAT
_MAX_ENTRY_BYTES = 64 * 1024 * 1024  # a whole 128k-token answer is a few MB; more is not ours
_KEY_FILE = "prompt-cache.key"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO planted as an entry must not hang the open (it is then refused by fstat).
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC


class _Miss(Exception):
    """Raised instead of computing: the cache is only ever filled by ``PromptCache.put``."""


class _BadEntry(Exception):
    """An entry that must not be used; its message says why, for the log."""


def _signed_answer(key: Mapping[str, Any], _answer: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    # joblib memoizes this function on ``key`` alone (``_answer`` is ignored for hashing).
    if _answer is None:
        raise _Miss
    return _answer


# ----------------------------------------------------------------------- the answer's shape


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text(value: object) -> bool:
    return type(value) is str


def _is_optional_text(value: object) -> bool:
    return value is None or type(value) is str


def _is_optional_count(value: object) -> bool:
    return value is None or _is_count(value)


def _is_seed(value: object) -> bool:
    return value is None or type(value) is int


def _is_flag(value: object) -> bool:
    return type(value) is bool


def _is_finished(value: object) -> bool:
    return type(value) is str and value in ("stop", "length")  # only answers that ended normally are kept


def _is_pieces(value: object) -> bool:
    return type(value) is list and all(type(piece) is str for piece in value)


# Exactly what the pipeline stores: ``RequestStats.as_dict()`` and the streamed pieces. A field
# added there must be added here too (tests/test_prompt_cache_hardening.py checks they agree);
# until then such answers are not stored (one warning), never stored in a shape we would refuse.
_ANSWER_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "pieces": (_is_pieces, "a list of strings"),
    "model": (_is_text, "a string"),
    "prompt_tokens": (_is_count, "a count"),
    "completion_tokens": (_is_count, "a count"),
    "reused_prompt_tokens": (_is_count, "a count"),
    "time_to_first_token": (_is_number, "a finite number"),
    "load_seconds": (_is_number, "a finite number"),
    "total_seconds": (_is_number, "a finite number"),
    "generation_seconds": (_is_number, "a finite number"),
    "tokens_per_second": (_is_number, "a finite number"),
    "generation_tokens_per_second": (_is_number, "a finite number"),
    "prompt_tokens_per_second": (_is_number, "a finite number"),
    "finish_reason": (_is_finished, '"stop" or "length"'),
    "cached": (_is_flag, "true or false"),
    "seed": (_is_seed, "an integer or null"),
    "model_hash": (_is_optional_text, "a string or null"),
    "schema": (_is_optional_text, "a string or null"),
    "max_tokens": (_is_optional_count, "a count or null"),
    "drafted_tokens": (_is_count, "a count"),
    "accepted_tokens": (_is_count, "a count"),
}


def _answer_problem(answer: object) -> str | None:
    """Why ``answer`` is not an answer this module would write, or None when it is one."""
    if type(answer) is not dict:
        return f"the entry is {type(answer).__name__}, not an object"
    missing = _ANSWER_FIELDS.keys() - answer.keys()
    extra = answer.keys() - _ANSWER_FIELDS.keys()
    if missing or extra:
        names = [f"missing {name!r}" for name in sorted(missing)] + [f"unexpected {name!r}" for name in sorted(extra)]
        return "fields: " + ", ".join(names)[:200]
    for name, (check, expected) in _ANSWER_FIELDS.items():
        if not check(answer[name]):
            return f"{name!r} is not {expected}"
    return None


# ------------------------------------------------------------------ signing and private files


def key_file() -> Path:
    """The per-user key that signs prompt-cache entries. It lives beside, never inside, the
    default cache folder: a shared ``cache.directory`` must not hold the key that vouches for it."""
    return paths.cache_dir() / _KEY_FILE


def _mac(key: bytes, call_id: Sequence[str], payload: bytes) -> bytes:
    # The request's id is signed with the answer, so an entry moved to another request's folder
    # fails: a valid answer to one question is never served for another.
    signer = hmac.new(key, _MAGIC, hashlib.sha256)
    signer.update("\0".join(call_id).encode("utf-8") + b"\n")
    signer.update(payload)
    return signer.hexdigest().encode("ascii")


def _seal(key: bytes, call_id: Sequence[str], answer: Mapping[str, Any]) -> bytes:
    # ensure_ascii (the default): a piece with a lone surrogate round-trips instead of failing.
    payload = json.dumps(answer, allow_nan=False, separators=(",", ":")).encode("ascii")
    return _MAGIC + _mac(key, call_id, payload) + b"\n" + payload


def _unseal(key: bytes, call_id: Sequence[str], data: bytes) -> dict[str, Any]:
    header, newline, payload = data.partition(b"\n")
    if not newline or not header.startswith(_MAGIC):
        raise _BadEntry(f"not a format-{CACHE_FORMAT} entry (empty, damaged or half written)")
    if not hmac.compare_digest(header[len(_MAGIC) :], _mac(key, call_id, payload)):
        raise _BadEntry("its signature does not match (damaged, changed since, or not written with this user's key)")
    try:
        answer = json.loads(payload)
    except (ValueError, RecursionError) as error:
        raise _BadEntry(f"unreadable JSON ({error})") from None
    problem = _answer_problem(answer)
    if problem is not None:
        raise _BadEntry(f"not an answer: {problem}")
    return cast("dict[str, Any]", answer)  # checked field by field above


def _make_private_dirs(folder: Path) -> None:
    """``mkdir -p`` with every folder it creates 0700 (``os.makedirs`` gives its mode to the last one only)."""
    missing: list[Path] = []
    current = folder
    while not current.is_dir() and current.parent != current:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path)) from None


def _tighten(folder: Path) -> None:
    """An existing folder of ours (format 1 made them 0755) becomes 0700; anyone else's is left alone."""
    try:
        info = folder.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(folder, 0o700)
    except OSError:
        pass


def _open_private(path: str, mode: str) -> IO[bytes]:
    """joblib's ``open`` for its store: new files 0600 and never through a link; reads refuse
    links, pipes and devices (an entry is a regular file or nothing)."""
    if mode == "wb":
        return os.fdopen(os.open(path, _CREATE_FLAGS, 0o600), "wb")
    if mode != "rb":
        raise ValueError(f"unexpected mode {mode!r}")
    fd = os.open(path, _READ_FLAGS)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "Not a regular file", path)
    return os.fdopen(fd, "rb")


def _write_private(data: bytes, path: str) -> None:
    fd = os.open(path, _CREATE_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # never leave a half-written temporary behind (a full disk, say)
        raise


def _read_key(path: Path) -> bytes | None:
    try:
        with _open_private(str(path), "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid == os.getuid() and info.st_mode & 0o077:
                os.fchmod(file.fileno(), 0o600)
            return file.read(256)
    except FileNotFoundError:
        return None


def _create_key(path: Path) -> None:
    """Write a new random key under a temporary name, then hard-link it into place: the key file
    appears whole or not at all, and when two processes race, both use the first one's key."""
    _make_private_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(secrets.token_hex(32).encode("ascii") + b"\n", str(temporary))
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process made it first: its key is the key
    except OSError:
        if not path.exists():  # a filesystem without hard links: a rename is nearly as good
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _signing_key(path: Path) -> bytes:
    """The key in ``path``, made on first use. Raises OSError, or ValueError for a damaged file."""
    data = _read_key(path)
    if data is None:
        _create_key(path)
        data = _read_key(path)
    text = (data or b"").strip()
    if len(text) != 64 or text.strip(b"0123456789abcdef"):
        raise ValueError(f"{path} is not a prompt-cache key; delete it and a new one is made")
    return bytes.fromhex(text.decode("ascii"))


@functools.cache
def _register_store_backend() -> None:
    """joblib's file store with signed JSON in place of pickles, and private files (registered
    once, lazily: importing joblib takes a quarter of a second)."""
    import joblib
    from joblib._store_backends import FileSystemStoreBackend

    class SignedJsonStore(FileSystemStoreBackend):  # type: ignore[misc]  # joblib ships no type hints
        key = b""
        _open_item = staticmethod(_open_private)

        def configure(self, location: str, verbose: int = 0, backend_options: dict[str, Any] | None = None) -> None:
            # joblib's own configure is not called: it makes the folder and a .gitignore beside it
            # with the umask's modes, and writes that .gitignore through any link planted there.
            options = backend_options or {}
            self.key = options["key"]
            self.location = location
            self.compress = False
            self.mmap_mode = None
            self.verbose = verbose
            root = Path(location)
            _make_private_dirs(root)
            _tighten(root)
            try:
                _write_private(b"# Created by nbllm's prompt cache (joblib).\n*\n", str(root.parent / ".gitignore"))
            except OSError:
                pass  # there already (or a read-only parent): it only keeps git away

        def create_location(self, location: str) -> None:
            _make_private_dirs(Path(location))

        def clear_location(self, location: str) -> None:
            if location != self.location and os.path.islink(location):
                os.unlink(location)  # rmtree refuses links; a planted one must go all the same
            else:
                super().clear_location(location)

        def store_metadata(self, call_id: Sequence[str], metadata: Mapping[str, Any]) -> None:
            """Not written: joblib's metadata is the call's arguments — the prompt — in clear text."""

        def get_metadata(self, call_id: Sequence[str]) -> dict[str, Any]:
            return {}

        def dump_item(self, call_id: Sequence[str], item: Mapping[str, Any], verbose: int = 1) -> None:
            # Unlike joblib's, errors propagate: PromptCache.put turns a failed write into one warning.
            folder = os.path.join(self.location, *call_id)
            self.create_location(folder)
            target = os.path.join(folder, _ITEM_FILE)
            self._concurrency_safe_write(_seal(self.key, call_id, item), target, _write_private)

        def load_item(
            self,
            call_id: Sequence[str],
            verbose: int = 1,
            timestamp: float | None = None,
            metadata: Mapping[str, Any] | None = None,
        ) -> dict[str, Any]:
            """The entry's answer, signature and shape checked; FileNotFoundError when it is gone
            (trimmed by another process meanwhile), _BadEntry when it must not be used."""
            path = os.path.join(self.location, *call_id, _ITEM_FILE)
            try:
                file = _open_private(path, "rb")
            except FileNotFoundError:
                raise
            except OSError as error:
                raise _BadEntry(f"cannot be opened as a file ({error.strerror or error})") from None
            with file:
                info = os.fstat(file.fileno())
                if info.st_size > _MAX_ENTRY_BYTES:
                    raise _BadEntry(f"{info.st_size} bytes, more than any answer")
                answer = _unseal(self.key, call_id, file.read(_MAX_ENTRY_BYTES + 1))
                _touch(file.fileno(), path, info.st_mtime_ns)
            return answer

    joblib.register_store_backend(_BACKEND_NAME, SignedJsonStore)


def _touch(fd: int, path: str, mtime_ns: int) -> None:
    """Record the access (joblib's trimming drops the least recently accessed entry first)."""
    try:
        if os.utime in os.supports_fd:
            os.utime(fd, ns=(time.time_ns(), mtime_ns))
        else:
            os.utime(path, ns=(time.time_ns(), mtime_ns), follow_symlinks=False)
    except OSError:
        pass


# --------------------------------------------------------------------------------- the cache


class PromptCache:
    def __init__(self, directory: Path, max_entries: int) -> None:
        self.directory = directory
        self.max_entries = max_entries
        self.disabled_reason: str | None = None
        self._func: Any = None
        self._memory: Any = None
        self._lock = threading.Lock()
        self._damaged_logged = False
        self._unstorable_logged = False

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.disabled_reason is None

    def _disable(self, why: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = why
            log.warning("Prompt cache turned off: %s. Generation works as before, without it.", why)

    def _open(self) -> Any:
        if self._func is not None:
            return self._func
        with self._lock:
            if self._func is None and self.disabled_reason is None:
                self._func = self._open_store()
        return self._func

    def _open_store(self) -> Any:
        import joblib

        try:
            _make_private_dirs(self.directory)
            probe = self.directory / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
            _write_private(b"ok", str(probe))
            probe.unlink()
        except OSError as error:
            self._disable(f"cannot write to {self.directory} ({error.strerror or error})")
            return None
        try:
            key = _signing_key(key_file())
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            self._disable(f"cannot use its signing key {key_file()} ({reason})")
            return None
        _register_store_backend()
        try:
            self._memory = joblib.Memory(
                location=str(self.directory), backend=_BACKEND_NAME, verbose=0, backend_options={"key": key}
            )
            func = self._memory.cache(_signed_answer, ignore=["_answer"])
        except OSError as error:
            self._disable(f"cannot write to {self.directory} ({error.strerror or error})")
            return None
        self._remove_format_1(Path(self._memory.store_backend.location))
        return func

    @staticmethod
    def _remove_format_1(store: Path) -> None:
        old = store.joinpath(*_FORMAT_1_FUNC)
        if os.path.lexists(old):
            if old.is_symlink():
                old.unlink(missing_ok=True)
            else:
                shutil.rmtree(old, ignore_errors=True)
            log.info("Removed the prompt cache's format-1 (pickle) entries from %s; they are never read.", old)

    def get(self, key: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if not self.enabled:
            return None
        func = self._open()
        if func is None:
            return None
        try:
            # A reference to the stored entry, loaded only by .get(); absent -> _Miss.
            ref = func.call_and_shelve(key)
        except _Miss:
            return None
        except Exception as error:  # a damaged store must never break generation
            self._log_damaged(error, removed=False)
            return None
        try:
            return cast("dict[str, Any]", ref.get())  # an answer checked by load_item
        except FileNotFoundError:
            return None  # trimmed or cleared by another process just now: a plain miss
        except Exception as error:
            # Damaged, half-written by a crashed writer, forged, tampered, or of another shape.
            try:
                ref.clear()
            except OSError:
                pass
            self._log_damaged(error, removed=True)
            return None

    def put(self, key: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        func = self._open()
        if func is None:
            return
        answer = dict(answer)
        problem = _answer_problem(answer)
        if problem is not None:  # it would be refused when read: not worth writing
            if not self._unstorable_logged:
                self._unstorable_logged = True
                log.warning("An answer was not stored in the prompt cache: %s (nbllm/core/prompt_cache.py).", problem)
            return
        try:
            func.call(key, _answer=answer)
            self._memory.reduce_size(items_limit=self.max_entries)
        except OSError as error:
            self._disable(f"cannot write to {self.directory} ({error.strerror or error})")

    def clear(self) -> None:
        func = self._open()
        if func is not None:
            try:
                func.clear(warn=False)
            except OSError as error:
                log.warning("Could not clear the prompt cache in %s: %s", self.directory, error)

    def _entries_root(self) -> Path | None:
        func = self._open()
        if func is None:
            return None
        return Path(func.store_backend.location) / Path(*func.func_id.split("/"))

    def entries(self) -> list[Path]:
        root = self._entries_root()
        if root is None or not root.is_dir():
            return []
        return [p for p in root.iterdir() if p.is_dir() and (p / _ITEM_FILE).exists()]

    def disk_bytes(self) -> int:
        root = self._entries_root()
        if root is None or not root.is_dir():
            return 0
        total = 0
        for folder, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except OSError:
                    pass
        return total

    def _log_damaged(self, error: BaseException, *, removed: bool) -> None:
        what = "Removed a damaged prompt-cache entry" if removed else "Could not read a prompt-cache entry"
        if not self._damaged_logged:
            self._damaged_logged = True
            log.warning("%s in %s and treated it as a miss: %s.", what, self.directory, error)
        else:
            log.debug("%s in %s and treated it as a miss: %s.", what, self.directory, error)
