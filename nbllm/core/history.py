"""The history log: one SQLite row per answer, as simonw/llm keeps ``logs.db``.

Where: ``history.db`` in nbllm's data folder (``~/.local/share/nbllm``, or ``$NBLLM_HOME``), or
the config's ``history.file``. Off: ``history: {enabled: false}`` or ``NBLLM_HISTORY=0``. Each
row holds the time (UTC), where the request came from (magic, panel, api, server, cli), the
model's name and file SHA-256, the prompt and messages, the parameters and seed, the answer,
its stats and how it ended (stop, length, cancelled, error), and a schema or tools if any.

The answer pipeline hands a finished answer to ``HistoryLog.record``, which only queues it:
one writer thread per process serializes and inserts, so generation never waits on the disk or
on another kernel's lock. Many kernels may write one file at once: WAL mode and a busy timeout
let each wait its turn. The log is bounded (``max_rows``, ``max_bytes``): the oldest rows go
first. Whatever goes wrong with the file (damaged, locked past the timeout, a folder in its
place, a read-only folder) is one warning per log, and answers go on unrecorded; nothing is
moved or deleted, the file is the user's.

Reading builds no objects from the file beyond numbers, strings and JSON values, and each
field written is cut at ``MAX_FIELD_CHARS``, so one huge prompt cannot push out every other row.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from nbllm.core.errors import CacheError, ParameterError, did_you_mean
from nbllm.core.table import Table

log = logging.getLogger("nbllm")

ORIGINS = ("api", "magic", "panel", "server", "cli")
BUSY_TIMEOUT_SECONDS = 10.0  # another kernel's write takes milliseconds; this is plenty
MAX_FIELD_CHARS = 1_000_000  # per prompt, messages, answer: a longer one is cut, with a note
EXIT_WAIT_SECONDS = 5.0  # at exit, for queued answers to be written (a locked file: given up)
MAX_QUEUED = 10_000  # answers waiting for the writer; past this, new ones are dropped (one warning)
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    origin TEXT NOT NULL,
    model TEXT NOT NULL,
    model_sha256 TEXT,
    kind TEXT NOT NULL,
    prompt TEXT,
    messages TEXT,
    params TEXT NOT NULL,
    seed INTEGER,
    answer TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    cached INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    seconds REAL,
    tokens_per_second REAL,
    time_to_first_token REAL,
    schema TEXT,
    tools TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS answers_time ON answers (time);
"""
COLUMNS = (
    "id", "time", "origin", "model", "model_sha256", "kind", "prompt", "messages", "params", "seed", "answer",
    "finish_reason", "cached", "prompt_tokens", "completion_tokens", "seconds", "tokens_per_second",
    "time_to_first_token", "schema", "tools", "error",
)  # fmt: skip
JSON_COLUMNS = ("messages", "params", "schema", "tools")
# nbllm.history()'s DataFrame: what one reads first, first.
FRAME_COLUMNS = (
    "time", "origin", "model", "prompt", "answer", "finish_reason", "cached", "prompt_tokens", "completion_tokens",
    "seconds", "tokens_per_second", "time_to_first_token", "seed", "params", "messages", "schema", "tools", "error",
    "kind", "model_sha256", "id",
)  # fmt: skip
_OFF_WORDS = ("0", "false", "no", "off")


def now_iso() -> str:
    """The current time as stored: UTC, ISO 8601, microseconds (so that text order is time order)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Entry:
    """One answer, as the pipeline hands it over: plain values, serialized by the writer."""

    origin: str
    model: str
    model_sha256: str | None
    kind: str
    prompt: str | None
    messages: Sequence[Mapping[str, Any]] | None
    params: Mapping[str, Any]
    seed: int | None
    answer: str
    finish_reason: str
    cached: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    tokens_per_second: float | None = None
    time_to_first_token: float | None = None
    schema: Mapping[str, Any] | None = None
    tools: Any = None
    error: str | None = None
    time: str = field(default_factory=now_iso)

    def row(self) -> tuple[Any, ...]:
        return (
            self.time, self.origin, self.model, self.model_sha256, self.kind, _cut(self.prompt),
            _cut(_json(self.messages)), _json(self.params) or "{}", self.seed, _cut(self.answer) or "",
            self.finish_reason, int(self.cached), self.prompt_tokens, self.completion_tokens, self.seconds,
            self.tokens_per_second, self.time_to_first_token, _json(self.schema), _json(self.tools), _cut(self.error),
        )  # fmt: skip


def _json(value: Any) -> str | None:
    if value is None:
        return None
    # default=str: a value JSON cannot hold (a pydantic class in a schema's description, say)
    # is kept as its text rather than losing the whole row.
    return json.dumps(value, ensure_ascii=False, default=str)


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}\n[... {len(text) - MAX_FIELD_CHARS:,} more characters not kept in the history]"


def switched_off_by_environment() -> bool:
    return os.environ.get("NBLLM_HISTORY", "").strip().lower() in _OFF_WORDS


class HistoryLog:
    """The log in one file, with its switch and bounds (from the config's ``history`` section)."""

    def __init__(self, path: Path, *, enabled: bool = True, max_rows: int = 10_000, max_bytes: int | None = None):
        self.path = path
        self.enabled = enabled
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.problem: str | None = None  # the last write's failure, once warned about

    @property
    def active(self) -> bool:
        """Recording now: on in the config and not switched off by ``NBLLM_HISTORY=0``."""
        return self.enabled and not switched_off_by_environment()

    def record(self, entry: Entry) -> None:
        """Queue ``entry`` for the writer thread; returns at once (see the module)."""
        if self.active:
            _WRITER.put(self, entry)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every answer queued so far is written (or failed); False on timeout."""
        return _WRITER.flush(timeout)

    # ------------------------------------------------------------------ reading

    def query(
        self,
        *,
        model: str | None = None,
        search: str | None = None,
        since: Any = None,
        origin: str | None = None,
        limit: int | None = 50,
    ) -> list[dict[str, Any]]:
        """Rows, newest first, as dicts (JSON columns parsed); filters checked first."""
        where, args = _filters(model, search, since, origin)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ParameterError(f"limit = {limit!r}: must be a positive integer, or None for every row.")
        self.flush()
        if not self._readable():
            return []
        sql = f"SELECT {', '.join(COLUMNS)} FROM answers{where} ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._reading() as connection:
            try:
                rows = connection.execute(sql, args).fetchall()
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):
                    return []
                raise
        return [_as_dict(row) for row in rows]

    def clear(self) -> int:
        """Delete every row; returns how many there were."""
        self.flush()
        if not self._readable():
            return 0
        with self._reading() as connection:
            try:
                with connection:
                    return connection.execute("DELETE FROM answers").rowcount
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):
                    return 0
                raise

    def _readable(self) -> bool:
        """True when the file is there to read; False when there is none yet; a clear error when
        something else is in its place (never opened: a FIFO would block)."""
        if _regular_or_absent(self.path):
            return self.path.exists()
        raise CacheError(
            f"The history log {self.path} is not a file. Move it away, or name another file in the config's "
            "history.file."
        )

    def _reading(self) -> _Reader:
        return _Reader(self.path)


class _Reader:
    """A connection for ``query``/``clear``, whose failures are clear ``CacheError``s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        except sqlite3.Error as error:
            raise self._failure(error) from None
        return self.connection

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if self.connection is not None:
            self.connection.close()
        if isinstance(error, sqlite3.Error):
            raise self._failure(error) from None

    def _failure(self, error: sqlite3.Error) -> CacheError:
        return CacheError(
            f"Cannot read the history log {self.path}: {error}. Move that file away to start a new log "
            "(or turn history off: history: {enabled: false}, or NBLLM_HISTORY=0)."
        )


def _regular_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def _as_dict(row: Sequence[Any]) -> dict[str, Any]:
    data = dict(zip(COLUMNS, row, strict=True))
    for name in JSON_COLUMNS:
        if data[name] is not None:
            try:
                data[name] = json.loads(data[name])
            except (ValueError, RecursionError):
                pass  # kept as text: the row is still worth showing
    data["cached"] = bool(data["cached"])
    return data


# ---------------------------------------------------------------------- filters

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(since: Any) -> str:
    """``since`` as a stored time string: a datetime or date (naive: local time), an ISO date or
    time string (``"2026-12-01"``, ``"2026-12-01 14:00"``), or an age (``"30m"``, ``"1h"``, ``"2d"``)."""
    if isinstance(since, datetime):
        moment = since
    elif isinstance(since, date):
        moment = datetime(since.year, since.month, since.day)
    elif isinstance(since, str):
        age = _AGE.match(since)
        if age:
            seconds = float(age.group(1)) * _AGE_UNITS[age.group(2).lower()]
            moment = datetime.now(timezone.utc) - timedelta(seconds=seconds)
        else:
            try:
                moment = datetime.fromisoformat(since.strip())
            except ValueError:
                raise ParameterError(
                    f"since = {since[:60]!r}: give a date such as '2026-12-01', a time such as '2026-12-01 14:30', "
                    "an age such as '30m', '1h' or '2d', or a datetime."
                ) from None
    else:
        raise ParameterError(
            f"since must be a datetime, a date, or a string such as '2026-12-01' or '2d', not {type(since).__name__}."
        )
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is the user's local time
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _filters(model: Any, search: Any, since: Any, origin: Any) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if model is not None:
        if not isinstance(model, str) or not model.strip():
            raise ParameterError(f"model = {model!r}: must be a model name (as in the history's model column).")
        clauses.append("model = ?")
        args.append(model.strip())
    if search is not None:
        if not isinstance(search, str) or not search:
            raise ParameterError(f"search = {search!r}: must be a non-empty string to look for.")
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clauses.append(r"(prompt LIKE ? ESCAPE '\' OR messages LIKE ? ESCAPE '\' OR answer LIKE ? ESCAPE '\')")
        args += [pattern, pattern, pattern]
    if since is not None:
        clauses.append("time >= ?")
        args.append(parse_since(since))
    if origin is not None:
        if origin not in ORIGINS:
            hint = did_you_mean(origin, ORIGINS) if isinstance(origin, str) else ""
            raise ParameterError(f"origin = {origin!r}: must be one of {', '.join(ORIGINS)}.{hint}")
        clauses.append("origin = ?")
        args.append(origin)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


# ---------------------------------------------------------------------- the writer thread


class _Writer:
    """One thread per process that writes every log's queued answers, a batch per transaction."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[HistoryLog, Entry]] = queue.Queue(MAX_QUEUED)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._dropped_warned = False

    def put(self, history: HistoryLog, entry: Entry) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:  # a process ending right after an answer (nbllm run) still records it
                    atexit.register(_close_all)  # runs last (registered first): checkpoints the files
                    atexit.register(self.flush, EXIT_WAIT_SECONDS)
                self._thread = threading.Thread(target=self._run, name="nbllm-history", daemon=True)
                self._thread.start()
            self._pending += 1
        try:
            self._queue.put_nowait((history, entry))
        except queue.Full:
            self._done(1)
            if not self._dropped_warned:
                self._dropped_warned = True
                log.warning("The history log is %d answers behind; answers are not recorded until it catches up.",
                            MAX_QUEUED)  # fmt: skip

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _done(self, count: int) -> None:
        with self._idle:
            self._pending -= count
            if not self._pending:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_log: dict[int, tuple[HistoryLog, list[Entry]]] = {}
            for history, entry in batch:
                by_log.setdefault(id(history), (history, []))[1].append(entry)
            for history, entries in by_log.values():
                try:
                    write(history, entries)
                except Exception as error:  # never let one bad batch stop the thread
                    _warn(history, f"{type(error).__name__}: {error}")
            self._done(len(batch))


_WRITER = _Writer()


def write(history: HistoryLog, entries: Sequence[Entry]) -> None:
    """Insert ``entries`` and apply the bounds, in one transaction; a failure is one warning."""
    with _CONNECTIONS_LOCK:
        try:
            connection = _connection(history.path)
        except (OSError, sqlite3.Error) as error:
            _warn(history, str(error))
            return
        try:
            with connection:
                connection.executemany(
                    f"INSERT INTO answers ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})",
                    [entry.row() for entry in entries],
                )
                _bound(connection, history)
        except sqlite3.Error as error:
            _forget(history.path)  # opened afresh next time: the file may have been replaced
            _warn(history, str(error))
            return
    if history.problem is not None:
        log.info("The history log %s is recording again.", history.path)
        history.problem = None


# The writer keeps one connection per file open: opening costs ~0.3 ms, and closing the last
# connection to a WAL database checkpoints it (an fsync: ~10 ms measured on this machine, most of
# an insert's cost); an insert on an open connection takes ~0.05 ms. Kept with the file's inode,
# so a log deleted or replaced meanwhile is opened afresh rather than written into the void.
_CONNECTIONS: dict[Path, tuple[sqlite3.Connection, int]] = {}
_CONNECTIONS_LOCK = threading.Lock()
KEPT_CONNECTIONS = 4


def _connection(path: Path) -> sqlite3.Connection:
    kept = _CONNECTIONS.get(path)
    if kept is not None:
        try:
            same = os.lstat(path).st_ino == kept[1]
        except OSError:
            same = False
        if same:
            return kept[0]
        _forget(path)
    connection = _open(path)
    _CONNECTIONS[path] = (connection, os.lstat(path).st_ino)
    while len(_CONNECTIONS) > KEPT_CONNECTIONS:  # a process that wrote many logs (tests) keeps few open
        _forget(next(iter(_CONNECTIONS)))
    return connection


def _forget(path: Path) -> None:
    kept = _CONNECTIONS.pop(path, None)
    if kept is not None:
        kept[0].close()


def _close_all() -> None:
    with _CONNECTIONS_LOCK:
        for path in list(_CONNECTIONS):
            _forget(path)


def _open(path: Path) -> sqlite3.Connection:
    if not _regular_or_absent(path):
        raise OSError(f"{path} is not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    # check_same_thread off: the writer thread uses it, and tests call write() from their own;
    # _CONNECTIONS_LOCK keeps it to one thread at a time.
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
    try:
        # WAL: readers never block the writer, and writers from several kernels queue on the busy
        # timeout instead of failing. The mode is kept in the file; set by whoever creates it.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL's safe default: durable at checkpoints
        connection.executescript(_SCHEMA)
        if created:
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            os.chmod(path, 0o600)  # prompts and answers are private: the owner's alone
    except BaseException:
        connection.close()
        raise
    return connection


def _bound(connection: sqlite3.Connection, history: HistoryLog) -> None:
    """The oldest rows out: past ``max_rows``, then while the live pages pass ``max_bytes``."""
    connection.execute("DELETE FROM answers WHERE id <= (SELECT MAX(id) FROM answers) - ?", (history.max_rows,))
    if history.max_bytes is None:
        return
    while True:
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        (free,) = connection.execute("PRAGMA freelist_count").fetchone()
        (size,) = connection.execute("PRAGMA page_size").fetchone()
        (rows,) = connection.execute("SELECT COUNT(*) FROM answers").fetchone()
        if (pages - free) * size <= history.max_bytes or rows <= 1:
            return
        # A tenth at a time: freed pages are reused by the next rows, so the file stops growing.
        connection.execute(
            "DELETE FROM answers WHERE id IN (SELECT id FROM answers ORDER BY id LIMIT ?)", (max(rows // 10, 1),)
        )


def _warn(history: HistoryLog, problem: str) -> None:
    if history.problem is None:
        log.warning(
            "The history log %s cannot be written (%s); answers go on unrecorded. Move that file away to start a new "
            "log, or turn history off (history: {enabled: false}, or NBLLM_HISTORY=0).",
            history.path,
            problem,
        )
    history.problem = problem


def table(rows: Sequence[Mapping[str, Any]], width: int = 60) -> Table:
    """Rows as a table to read (``%llm history``): one line each, local time, texts cut short."""
    shown = [
        {
            "time": datetime.fromisoformat(row["time"]).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "origin": row["origin"],
            "model": row["model"],
            "prompt": _one_line(row["prompt"] or "", width),
            "answer": _one_line(row["answer"] or "", width),
            "tokens": row["completion_tokens"],
            "t/s": row["tokens_per_second"],
            "finish": row["finish_reason"] + (" (cached)" if row["cached"] else ""),
        }
        for row in rows
    ]
    columns = ["time", "origin", "model", "prompt", "answer", "tokens", "t/s", "finish"]
    return Table(shown, columns=columns, title=None if shown else "No answers in the history.")


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
