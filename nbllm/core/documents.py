"""The documents behind ``nbllm.ask(question, docs=...)``: what is read, and how it is cut into chunks.

Plain Python and the standard library only: pandas is never imported (a Series is used through
the object the user hands in), nothing is ever executed or imported from the documents, and no
model is involved. Retrieval and answering live above this module.

What ``docs`` may be
    * a ``str``: if it names an existing file or folder (after ``~`` expansion), that path.
      Otherwise it is the text of one document (source ``"text 1"``), unless it *looks like a
      path*, in which case it is most likely a typo and a ``ParameterError`` says so rather than
      quietly searching the path's own letters. A string looks like a path when it is one line
      and it starts with ``~``, ``./`` or ``../``, or is absolute, or has a path separator and no
      spaces, or ends in one of the extensions read below (``notes.md``, ``my notes.txt``). A text
      with a line break never looks like a path. To search a one-line text that looks like a
      path, pass it as ``{"name": text}``: a dict's values are always texts.
    * a ``pathlib.Path`` (or any ``os.PathLike``): it must exist.
    * a list or tuple of those, mixed; its texts are ``"text N"`` by position, from 1.
    * a dict ``{name: text}``: the source of each text is its name.
    * a pandas Series of texts (anything with ``.items()`` and ``.index`` that is not a mapping):
      the source of each value is ``"row <index>"``. A value that is not a ``str`` (NaN and None
      included) is refused, naming the row.

Folders
    Read recursively in sorted order, so the same folder always gives the same chunks. Hidden
    entries (``.git``, ``.ipynb_checkpoints``...), ``__pycache__``, ``node_modules`` and Python
    environments (a folder holding ``pyvenv.cfg`` or ``conda-meta``) are left out silently.
    Symbolic links to folders are never followed (a link to a parent would loop): they are
    listed in ``skipped``. Links to files are read. Files are chosen by extension
    (``TEXT_EXTENSIONS``, and names such as ``README`` or ``Makefile``); others are counted as
    "other types", not as failures. A file named directly is read whatever its extension.
    Sources are paths relative to the folder given, with ``/``; when several folders are given,
    each such path starts with its folder as given, so that no two sources collide.

Files
    Anything but a regular file (a FIFO, a socket, a device) is skipped before it is opened: a
    FIFO would block forever. A file over ``max_file_bytes`` is skipped unread. A NUL byte in
    the first 8 KiB means binary; text must be UTF-8 (a BOM is allowed). The same file reached
    twice (named twice, or through a link) is read once. Past ``max_files`` files or
    ``max_total_bytes`` bytes, reading stops, and one entry in ``skipped`` says where.
    A notebook (``.ipynb``) is parsed as JSON: each markdown and code cell is one section,
    ``"notes.ipynb cell 5"`` (cells numbered from 1, as Jupyter shows them); outputs are ignored.

Chunks
    See ``chunk_text``: at most ``chunk_chars`` characters, cut at a blank line, else a line end,
    else a space, else anywhere; consecutive chunks share about ``overlap_chars`` characters,
    whole lines where possible, so that a passage cut in two is still found whole once.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nbllm.core.errors import ParameterError
from nbllm.core.paths import read_bytes_limited

TEXT_EXTENSIONS = frozenset(
    {
        # prose and markup
        ".txt", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".bib", ".html", ".htm", ".xml",
        # notebooks, data and configuration
        ".ipynb", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".csv", ".tsv", ".cfg", ".ini", ".conf", ".env",
        ".log", ".sql",
        # source code
        ".py", ".pyi", ".r", ".jl", ".m", ".sh", ".bash", ".zsh", ".ps1", ".js", ".mjs", ".ts", ".tsx", ".jsx",
        ".css", ".scss", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt", ".scala", ".swift",
        ".rb", ".php", ".pl", ".lua", ".f90", ".proto",
    }
)  # fmt: skip

# Files without an extension that are text by convention (compared case-insensitively).
TEXT_FILE_NAMES = frozenset(
    {"readme", "license", "licence", "copying", "notice", "authors", "changelog", "contributing", "makefile"}
    | {"dockerfile", "containerfile", "procfile", "gemfile", "vagrantfile"}
)

# Folders that hold tools' files, not the user's documents.
_SKIPPED_FOLDER_NAMES = frozenset({"__pycache__", "node_modules"})
_ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")

_BINARY_PROBE_BYTES = 8192
_MAX_PATH_CHARS = 4096  # longer strings are texts: no file system has such paths
_LIMIT_REACHED = "not read, nor any file after it"  # the prefix of the one "reading stopped" entry


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: what retrieval ranks and an answer cites."""

    text: str
    source: str  # "guide.md", "notes.ipynb cell 5", "text 3", "row 17", a dict's key
    number: int  # the chunk's place within its source, from 1
    lines: tuple[int, int] | None = None  # first and last line in the file (1-based), for files only

    @property
    def cite(self) -> str:
        """``guide.md:12-30`` (``guide.md:12`` for one line) for files; otherwise the source,
        with ``#2``, ``#3``... for the chunks after the first: ``text 3 #2``."""
        if self.lines is not None:
            first, last = self.lines
            return f"{self.source}:{first}" if first == last else f"{self.source}:{first}-{last}"
        return self.source if self.number == 1 else f"{self.source} #{self.number}"


@dataclass
class Corpus:
    """The chunks of all documents, and an account of what was left out and why."""

    chunks: list[Chunk]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source or path, reason)
    files: int = 0  # files read (a notebook is one)
    texts: int = 0  # texts given directly: strings, dict values, Series rows
    other_types: int = 0  # files in folders left out for their type, silently

    def summary(self) -> str:
        """One line: ``42 chunks from 7 files; 2 skipped (1 binary, 1 too large)``."""
        sources = []
        if self.files or not self.texts:
            sources.append(_count(self.files, "file"))
        if self.texts:
            sources.append(_count(self.texts, "text"))
        parts = [f"{_count(len(self.chunks), 'chunk')} from {' and '.join(sources)}"]
        problems = [reason for _, reason in self.skipped if not reason.startswith(_LIMIT_REACHED)]
        if problems:
            kinds = Counter(_kind(reason) for reason in problems)
            parts.append(f"{len(problems)} skipped ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})")
        if self.other_types:
            parts.append(f"{_count(self.other_types, 'file')} of other types ignored")
        parts.extend(
            "stopped early: " + reason.partition(": ")[2]
            for _, reason in self.skipped
            if reason.startswith(_LIMIT_REACHED)
        )
        return "; ".join(parts)


def load_corpus(
    docs: object,
    *,
    chunk_chars: int = 1200,
    overlap_chars: int = 200,
    max_files: int = 5000,
    max_file_bytes: int = 5_000_000,
    max_total_bytes: int = 200_000_000,
) -> Corpus:
    """Read ``docs`` (see the module's docstring for what it may be) and cut it into chunks.

    Caller mistakes (a missing path, a value that is not text, bad limits) raise
    ``ParameterError`` before anything is read; problems with single files (binary, too large,
    unreadable) are recorded in ``Corpus.skipped`` instead, so one bad file never spoils a folder.
    """
    _check_chunking(chunk_chars, overlap_chars)
    for name, value in (
        ("max_files", max_files),
        ("max_file_bytes", max_file_bytes),
        ("max_total_bytes", max_total_bytes),
    ):
        _check_whole(name, value, 1)
    inputs = _inputs(docs)
    reader = _Reader(chunk_chars, overlap_chars, max_files, max_file_bytes, max_total_bytes)
    # With several folders, files are named with their folder so that two README.md differ.
    several_folders = sum(isinstance(item, _Place) and os.path.isdir(item.path) for item in inputs) > 1
    for item in inputs:
        if isinstance(item, _Text):
            reader.add(item.source, item.text, from_file=False)
            reader.corpus.texts += 1
        else:
            prefix = item.given.rstrip("/" + os.sep) + "/" if several_folders else ""
            reader.read_place(item.given, item.path, prefix)
    return reader.corpus


def chunk_text(text: str, chunk_chars: int = 1200, overlap_chars: int = 200) -> list[tuple[str, int, int]]:
    """``text`` cut into ``(chunk, first line, last line)``, lines counted from 1.

    Each chunk has at most ``chunk_chars`` characters and is stripped (the line numbers are
    those of its first and last non-blank characters). A chunk ends at the last blank line in
    the second half of its window, else the last line end there, else the last space, else at
    ``chunk_chars``: cutting no earlier than half way keeps chunks full. The next chunk starts
    at the first whole line within ``overlap_chars`` before the cut, else just after the first
    space there, else exactly ``overlap_chars`` back; after a blank gap longer than the overlap,
    at the next text (no overlap). Line ends ``\r\n`` and ``\r`` count as ``\n``, and chunks hold
    ``\n``. Blank text gives no chunks. Every search is
    bounded by one window, so the time is linear in ``len(text)``, even on one 5 MB line.
    """
    _check_chunking(chunk_chars, overlap_chars)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    chunks: list[tuple[str, int, int]] = []
    first = _NOT_SPACE.search(text)
    if first is None:
        return chunks
    start = first.start()
    line_pos, line = 0, 1  # line numbers are counted forward from here only: linear overall
    half = chunk_chars - chunk_chars // 2  # rounded up, so that the overlap (< half) always moves on
    while True:
        line += text.count("\n", line_pos, start)
        line_pos = start
        last = len(text) - start <= chunk_chars
        end = len(text) if last else _cut(text, start + half, start + chunk_chars)
        # ``start`` is never blank, so only the end needs stripping.
        piece = text[start:end].rstrip()
        chunks.append((piece, line, line + piece.count("\n")))
        if last:
            return chunks
        following = _NOT_SPACE.search(text, end)
        if following is None:
            return chunks
        next_start = following.start()
        # Across a blank gap longer than the overlap, the overlap would hold little but blanks;
        # starting after it also keeps a long run of blanks from being scanned once per chunk.
        if overlap_chars and next_start - end <= overlap_chars:
            back = _NOT_SPACE.search(text, _overlap_start(text, end, overlap_chars))
            if back is not None and back.start() > start:
                next_start = back.start()
        start = next_start


_NOT_SPACE = re.compile(r"\S")
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


def _cut(text: str, low: int, high: int) -> int:
    """Where a chunk ending by ``high`` ends, no earlier than ``low``: the separator itself
    (blank line, line end, space) stays out of the chunk."""
    paragraph = -1
    for match in _BLANK_LINE.finditer(text, low, high + 1):
        paragraph = match.start()
    if paragraph != -1:
        return paragraph
    line_end = text.rfind("\n", low, high + 1)
    if line_end != -1:
        return line_end
    space = max(text.rfind(" ", low, high + 1), text.rfind("\t", low, high + 1))
    return space if space != -1 else high


def _overlap_start(text: str, end: int, overlap_chars: int) -> int:
    """Where the chunk after one ending at ``end`` starts: the first whole line within
    ``overlap_chars`` before ``end``, else after the first space there, else exactly there."""
    low = end - overlap_chars
    newline = text.find("\n", low - 1, end - 1)
    if newline != -1:
        return newline + 1
    spaces = [i for i in (text.find(" ", low, end), text.find("\t", low, end)) if i != -1]
    return min(spaces) + 1 if spaces else low


# --- what docs holds ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    source: str
    text: str


@dataclass(frozen=True)
class _Place:
    given: str  # as the user wrote it: sources show this, not the expanded path
    path: Path


_ACCEPTED = "a text, a path (str or pathlib.Path), a list of those, a dict {name: text} or a pandas Series of texts"


def _inputs(docs: object) -> list[_Text | _Place]:
    """``docs`` checked and sorted into texts and paths, before anything is read."""
    if isinstance(docs, str):
        return [_from_str(docs, 1)]
    if isinstance(docs, os.PathLike):
        return [_from_path(docs)]
    if isinstance(docs, Mapping):
        texts: list[_Text | _Place] = []
        for name, value in docs.items():
            if not isinstance(value, str):
                raise ParameterError(
                    f"docs[{name!r}] is {type(value).__name__}, not text: a dict given as docs maps names to texts."
                )
            texts.append(_Text(str(name), value))
        return texts
    if isinstance(docs, (list, tuple)):
        items: list[_Text | _Place] = []
        for position, item in enumerate(docs):
            if isinstance(item, str):
                items.append(_from_str(item, position + 1))
            elif isinstance(item, os.PathLike):
                items.append(_from_path(item))
            else:
                raise ParameterError(
                    f"docs[{position}] is {type(item).__name__}: a list given as docs holds texts and paths "
                    "(str or pathlib.Path)."
                )
        return items
    if isinstance(docs, (bytes, bytearray)):
        raise ParameterError("docs is bytes: decode them into a str first (for example data.decode('utf-8')).")
    if hasattr(docs, "columns") and hasattr(docs, "iterrows"):
        raise ParameterError("docs is a DataFrame: pass the column that holds the texts, for example df['text'].")
    items_method = getattr(docs, "items", None)
    if callable(items_method) and hasattr(docs, "index"):  # a pandas Series, duck-typed
        rows: list[_Text | _Place] = []
        for index, value in items_method():
            if not isinstance(value, str):
                raise _row_error(index, value)
            rows.append(_Text(f"row {index}", value))
        return rows
    raise ParameterError(f"docs must be {_ACCEPTED}, not {type(docs).__name__}.")


def _row_error(index: object, value: object) -> ParameterError:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    if missing or type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing values, by name
        return ParameterError(f"Row {index} of docs is missing ({value!r}): drop such rows first with .dropna().")
    return ParameterError(
        f"Row {index} of docs is {type(value).__name__}, not text: convert the Series first with .astype(str)."
    )


def _from_str(text: str, position: int) -> _Text | _Place:
    if _names_something(text):
        return _Place(text, Path(os.path.expanduser(text)))
    if _looks_like_path(text):
        hint = " nbllm reads local files: download it first." if "://" in text else ""
        raise ParameterError(
            f"No file or folder named {text!r}: check the path (a text to search must not look like a path; "
            f"to search this text itself, pass {{'name': text}}).{hint}"
        )
    return _Text(f"text {position}", text)


def _from_path(path: os.PathLike[str] | os.PathLike[bytes]) -> _Place:
    given = os.fspath(path)
    if not isinstance(given, str):
        raise ParameterError(f"docs holds the bytes path {given!r}: use a str or pathlib.Path.")
    if not _names_something(given):
        raise ParameterError(f"No file or folder named {given!r}: check the path.")
    return _Place(given, Path(os.path.expanduser(given)))


def _names_something(text: str) -> bool:
    # A document's text can be megabytes long: only plausible paths reach the file system.
    if not text.strip() or "\n" in text or "\0" in text or len(text) > _MAX_PATH_CHARS:
        return False
    return os.path.exists(os.path.expanduser(text))  # False for a broken link, too


def _looks_like_path(text: str) -> bool:
    candidate = text.strip()
    if not candidate or "\n" in candidate or len(candidate) > _MAX_PATH_CHARS:
        return False
    if candidate.startswith(("~", "./", "../", ".\\", "..\\")) or os.path.isabs(candidate):
        return True
    if re.match(r"[A-Za-z]:[\\/]", candidate):  # a Windows drive, on any system
        return True
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in candidate for sep in separators) and not any(c.isspace() for c in candidate):
        return True
    return os.path.splitext(candidate)[1].lower() in TEXT_EXTENSIONS


def _is_text_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in TEXT_EXTENSIONS or name.lower() in TEXT_FILE_NAMES


# --- reading ----------------------------------------------------------------------------


class _Skip(Exception):
    """A file left out, with the reason recorded in ``Corpus.skipped``."""


class _Reader:
    def __init__(
        self, chunk_chars: int, overlap_chars: int, max_files: int, max_file_bytes: int, max_total_bytes: int
    ) -> None:
        self.corpus = Corpus(chunks=[])
        self.chunk_chars = chunk_chars
        self.overlap_chars = overlap_chars
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.opened = 0
        self.bytes_read = 0
        self.stopped = False
        self.seen: dict[tuple[int, int], str] = {}  # (device, inode) -> source: each file once

    def add(self, source: str, text: str, *, from_file: bool) -> None:
        for number, (piece, first, last) in enumerate(chunk_text(text, self.chunk_chars, self.overlap_chars), 1):
            self.corpus.chunks.append(Chunk(piece, source, number, (first, last) if from_file else None))

    def skip(self, source: str, reason: str) -> None:
        self.corpus.skipped.append((source, reason))

    def read_place(self, given: str, path: Path, prefix: str) -> None:
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as error:  # it existed a moment ago
            self.skip(given, f"unreadable: {_reason(error)}")
            return
        if is_folder:
            self.read_folder(path, given, prefix)
        else:
            self.read_file(path, given)  # named directly: read whatever its extension

    def read_folder(self, root: Path, given: str, prefix: str) -> None:
        # Depth first with a stack of listings, not recursion: a deep tree cannot hit the
        # recursion limit. Each listing is sorted by name, so the order never depends on the disk.
        stack = [(iter(self.listing(root, given)), prefix)]
        while stack and not self.stopped:
            entries, folder_prefix = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name = entry.name
            if name.startswith(".") or name in _SKIPPED_FOLDER_NAMES:
                continue
            source = folder_prefix + name
            try:
                if entry.is_symlink():
                    try:
                        target_mode = os.stat(entry.path).st_mode
                    except OSError as error:
                        if _is_text_name(name):
                            broken = isinstance(error, FileNotFoundError)
                            self.skip(source, "broken symbolic link" if broken else f"unreadable: {_reason(error)}")
                        else:
                            self.corpus.other_types += 1
                        continue
                    if stat.S_ISDIR(target_mode):
                        self.skip(source, "symbolic link to a folder (not followed)")
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    if not any(os.path.lexists(os.path.join(entry.path, m)) for m in _ENVIRONMENT_MARKERS):
                        stack.append((iter(self.listing(Path(entry.path), source)), source + "/"))
                    continue
            except OSError as error:
                self.skip(source, f"unreadable: {_reason(error)}")
                continue
            if _is_text_name(name):
                self.read_file(Path(entry.path), source)
            else:
                self.corpus.other_types += 1

    def listing(self, folder: Path, source: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as entries:
                return sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            self.skip(source, f"unreadable: {_reason(error)}")
            return []

    def read_file(self, path: Path, source: str) -> None:
        if self.stopped:
            return
        try:
            self.read_checked_file(path, source)
        except _Skip as skipped:
            self.skip(source, str(skipped))
        except OSError as error:
            self.skip(source, f"unreadable: {_reason(error)}")

    def read_checked_file(self, path: Path, source: str) -> None:
        # Everything is decided on stat() before opening: a FIFO would block open() forever.
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip("not a regular file")
        if info.st_size > self.max_file_bytes:
            raise _Skip(_too_large(info.st_size, self.max_file_bytes))
        identity = (info.st_dev, info.st_ino)
        if info.st_ino and identity in self.seen:
            raise _Skip(f"same file as {self.seen[identity]}")
        if self.opened >= self.max_files:
            self.stop(source, f"the limit of {self.max_files} files was reached")
            return
        if self.bytes_read + info.st_size > self.max_total_bytes:
            self.stop(source, f"the limit of {_size(self.max_total_bytes)} in all was reached")
            return
        data = _read_bytes(path, self.max_file_bytes)
        self.opened += 1
        self.bytes_read += len(data)
        self.seen[identity] = source
        if b"\0" in data[:_BINARY_PROBE_BYTES]:
            raise _Skip("binary")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _Skip("not UTF-8 text") from None
        if path.suffix.lower() == ".ipynb":
            for cell_source, cell_text in _notebook_cells(text, source):
                self.add(cell_source, cell_text, from_file=False)
        else:
            self.add(source, text, from_file=True)
        self.corpus.files += 1

    def stop(self, source: str, why: str) -> None:
        self.stopped = True
        self.skip(source, f"{_LIMIT_REACHED}: {why}")


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        return read_bytes_limited(path, limit)
    except ValueError as error:  # swapped for a FIFO or grown since stat()
        why = "not a regular file" if "regular" in str(error) else f"too large (over {_size(limit)})"
        raise _Skip(why) from None


def _notebook_cells(text: str, source: str) -> list[tuple[str, str]]:
    """``(source, text)`` of each markdown and code cell, all checked before any is used."""
    try:
        notebook = json.loads(text)
    except RecursionError:
        raise _Skip("invalid notebook: nested too deeply") from None
    except ValueError as error:
        raise _Skip(f"invalid notebook: {error}") from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list):
        raise _Skip("invalid notebook: no list of cells (nbformat 4 expected)")
    sections = []
    for number, cell in enumerate(cells, 1):  # every cell counts, as Jupyter numbers them
        if not isinstance(cell, dict):
            raise _Skip(f"invalid notebook: cell {number} is not an object")
        if cell.get("cell_type") not in ("markdown", "code"):
            continue
        lines = cell.get("source", "")
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            lines = "".join(lines)
        if not isinstance(lines, str):
            raise _Skip(f"invalid notebook: the source of cell {number} is not text")
        sections.append((f"{source} cell {number}", lines))
    return sections


# --- small helpers ----------------------------------------------------------------------


def _check_whole(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{name} must be a whole number, not {type(value).__name__}.")
    if value < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, not {value}.")


def _check_chunking(chunk_chars: int, overlap_chars: int) -> None:
    _check_whole("chunk_chars", chunk_chars, 100)
    _check_whole("overlap_chars", overlap_chars, 0)
    # Under half a chunk, every chunk brings new text: the cut is never before half way.
    if 2 * overlap_chars >= chunk_chars:
        raise ParameterError(
            f"overlap_chars must be less than half of chunk_chars ({chunk_chars}), not {overlap_chars}."
        )


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _kind(reason: str) -> str:
    """The kind of a skip reason, for the summary: ``too large (12.3 MB > 5 MB)`` -> ``too large``."""
    if reason.startswith("same file as "):
        return "duplicate"
    return re.split(r" \(|:", reason, maxsplit=1)[0]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    """Decimal units, as file managers show them: ``12.3 MB``, ``5 MB``, ``800 KB``, ``12 bytes``."""
    if n < 1000:
        return f"{n} bytes"
    value, unit = (n / 1_000_000, "MB") if n >= 1_000_000 else (n / 1000, "KB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _too_large(size: int, limit: int) -> str:
    shown, shown_limit = _size(size), _size(limit)
    if shown == shown_limit:  # 5,000,001 bytes over a 5 MB limit would read "5 MB > 5 MB"
        shown, shown_limit = f"{size:,} bytes", f"{limit:,} bytes"
    return f"too large ({shown} > {shown_limit})"
