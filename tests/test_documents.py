"""nbllm.core.documents: what ``ask(docs=...)`` reads, what it leaves out (and says so), and how
texts are cut into chunks. Real files in tmp_path: FIFOs, broken links, link loops, binary and
latin-1 files, notebooks."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from nbllm.core.documents import Chunk, Corpus, chunk_text, load_corpus
from nbllm.core.errors import ParameterError

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
needs_symlinks = pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")


# --- helpers ------------------------------------------------------------------------------


def numbered_prose(paragraphs: int, lines_per_paragraph: int = 5, words_per_line: int = 7) -> str:
    """Distinct words (w00001...), so that each chunk is found once in the text."""
    counter = iter(range(1, 10**6))
    paragraph_texts = [
        "\n".join(" ".join(f"w{next(counter):05d}" for _ in range(words_per_line)) for _ in range(lines_per_paragraph))
        for _ in range(paragraphs)
    ]
    return "\n\n".join(paragraph_texts) + "\n"


def spans(text: str, chunks: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Where each chunk lies in ``text`` (chunks of distinct words), checked in order."""
    found = []
    position = 0
    for piece, _, _ in chunks:
        at = text.find(piece, position)
        assert at != -1, f"chunk not found in order: {piece[:40]!r}"
        found.append((at, at + len(piece)))
        position = at + 1
    return found


def assert_well_formed(text: str, chunks: list[tuple[str, int, int]], chunk_chars: int, overlap_chars: int) -> None:
    """Sizes, stripping, line numbers, full coverage of the text and bounded overlaps."""
    located = spans(text, chunks)
    for (piece, first, last), (start, _) in zip(chunks, located, strict=True):
        assert 0 < len(piece) <= chunk_chars
        assert piece == piece.strip()
        assert first == text.count("\n", 0, start) + 1
        assert last == first + piece.count("\n")
    # Nothing but blanks is left out, before, between or after the chunks.
    assert not text[: located[0][0]].strip()
    assert not text[located[-1][1] :].strip()
    for (_, end), (next_start, _) in pairwise(located):
        assert next_start > located[0][0]
        if next_start > end:
            assert not text[end:next_start].strip()
        else:
            assert end - next_start <= overlap_chars


def write_notebook(path: Path) -> None:
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {},
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# Setup\n", "How the pump is primed."]},
            {
                "cell_type": "code",
                "metadata": {},
                "execution_count": 1,
                "source": "prime_pump(seconds=30)",
                "outputs": [{"output_type": "stream", "name": "stdout", "text": ["OUTPUT-NEVER-INDEXED\n"]}],
            },
            {"cell_type": "raw", "metadata": {}, "source": "raw cells are not read"},
            {"cell_type": "code", "metadata": {}, "execution_count": None, "source": [], "outputs": []},
            {"cell_type": "markdown", "metadata": {}, "source": "Cell five: the valve opens at 3 bar."},
        ],
    }
    path.write_text(json.dumps(notebook), encoding="utf-8")


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A folder with everything a real one may hold, good and bad."""
    root = tmp_path / "library"
    root.mkdir()
    # Written in reverse order of their names: the corpus must not depend on creation order.
    (root / "sub").mkdir()
    (root / "sub" / "deeper.md").write_text("Deeper notes about calibration.\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (root / "g_huge.txt").write_text("big " * 1250, encoding="utf-8")  # 5000 bytes
    (root / "f_latin1.txt").write_bytes("Le café est prêt.\n".encode("latin-1"))
    (root / "e_binary.txt").write_bytes(b"looks like text\x00\x01\x02 but is not")
    write_notebook(root / "d_notebook.ipynb")
    (root / "c_notes.txt").write_text("Remember: the filter is changed monthly.\n", encoding="utf-8")
    (root / "b_code.py").write_text('def prime():\n    """Prime the pump."""\n    return 30\n', encoding="utf-8")
    guide = "\n\n".join(f"Section {i}.\n" + "The pump needs care. " * 6 for i in range(1, 7))
    (root / "a_guide.md").write_text(guide, encoding="utf-8")
    # Left out silently: hidden entries, checkpoints, caches, packages, environments.
    for folder in (".hidden", ".ipynb_checkpoints", "__pycache__", "node_modules/pkg", "venv/lib"):
        (root / folder).mkdir(parents=True)
    (root / ".hidden" / "secret.md").write_text("SECRET", encoding="utf-8")
    (root / ".ipynb_checkpoints" / "d_notebook-checkpoint.ipynb").write_text("CHECKPOINT", encoding="utf-8")
    (root / "__pycache__" / "cached.py").write_text("CACHED", encoding="utf-8")
    (root / "node_modules" / "pkg" / "readme.md").write_text("PACKAGE", encoding="utf-8")
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n", encoding="utf-8")
    (root / "venv" / "lib" / "site.py").write_text("ENVIRONMENT", encoding="utf-8")
    (root / ".env.md").write_text("HIDDEN FILE", encoding="utf-8")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "notes.txt")  # opening it would block forever
    if os.name != "nt":
        os.symlink(root / "missing.md", root / "gone.md")
        os.symlink(root, root / "loop")  # a loop back to the folder itself
    return root


# --- folders ------------------------------------------------------------------------------


@pytest.mark.timeout(20)
@needs_fifo
@needs_symlinks
def test_a_folder_is_read_in_order_and_every_left_out_file_has_its_reason(library: Path) -> None:
    corpus = load_corpus(library, chunk_chars=300, overlap_chars=60, max_file_bytes=3000)

    sources = list(dict.fromkeys(chunk.source for chunk in corpus.chunks))
    assert sources == [
        "a_guide.md",
        "b_code.py",
        "c_notes.txt",
        "d_notebook.ipynb cell 1",
        "d_notebook.ipynb cell 2",
        "d_notebook.ipynb cell 5",
        "sub/deeper.md",
    ]
    assert corpus.skipped == [
        ("e_binary.txt", "binary"),
        ("f_latin1.txt", "not UTF-8 text"),
        ("g_huge.txt", "too large (5 KB > 3 KB)"),
        ("gone.md", "broken symbolic link"),
        ("loop", "symbolic link to a folder (not followed)"),
        ("notes.txt", "not a regular file"),
    ]
    assert corpus.files == 5
    assert corpus.other_types == 1  # image.png
    assert corpus.summary() == (
        f"{len(corpus.chunks)} chunks from 5 files; 6 skipped (1 binary, 1 not UTF-8 text, 1 too large, "
        "1 broken symbolic link, 1 symbolic link to a folder, 1 not a regular file); 1 file of other types ignored"
    )
    everything = "\n".join(chunk.text for chunk in corpus.chunks)
    for hidden in ("SECRET", "CHECKPOINT", "CACHED", "PACKAGE", "ENVIRONMENT", "HIDDEN FILE"):
        assert hidden not in everything
    # The guide is long enough for several chunks, each within the size and cited by its lines.
    guide = [chunk for chunk in corpus.chunks if chunk.source == "a_guide.md"]
    assert len(guide) > 1
    assert [chunk.number for chunk in guide] == list(range(1, len(guide) + 1))
    assert all(len(chunk.text) <= 300 for chunk in corpus.chunks)
    assert guide[0].cite == f"a_guide.md:{guide[0].lines[0]}-{guide[0].lines[1]}"  # type: ignore[index]


@pytest.mark.timeout(20)
@needs_fifo
@needs_symlinks
def test_the_same_folder_gives_the_same_corpus(library: Path) -> None:
    first = load_corpus(str(library), chunk_chars=300, overlap_chars=60, max_file_bytes=3000)
    second = load_corpus(library, chunk_chars=300, overlap_chars=60, max_file_bytes=3000)
    assert first == second
    assert len(first.chunks) > 5


def test_notebooks_give_one_section_per_markdown_and_code_cell_and_never_their_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_notebook(tmp_path / "pump.ipynb")
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus(Path("pump.ipynb"))
    assert [(chunk.source, chunk.text, chunk.lines, chunk.cite) for chunk in corpus.chunks] == [
        ("pump.ipynb cell 1", "# Setup\nHow the pump is primed.", None, "pump.ipynb cell 1"),
        ("pump.ipynb cell 2", "prime_pump(seconds=30)", None, "pump.ipynb cell 2"),
        ("pump.ipynb cell 5", "Cell five: the valve opens at 3 bar.", None, "pump.ipynb cell 5"),
    ]
    assert corpus.files == 1
    assert corpus.summary() == "3 chunks from 1 file"


def test_a_long_notebook_cell_is_cited_by_chunk_number(tmp_path: Path) -> None:
    notebook = {"nbformat": 4, "cells": [{"cell_type": "markdown", "source": numbered_prose(10)}]}
    (tmp_path / "long.ipynb").write_text(json.dumps(notebook), encoding="utf-8")
    chunks = load_corpus(tmp_path, chunk_chars=200, overlap_chars=40).chunks
    assert len(chunks) > 2
    assert [chunk.cite for chunk in chunks[:3]] == ["long.ipynb cell 1", "long.ipynb cell 1 #2", "long.ipynb cell 1 #3"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "invalid notebook: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[1, 2]", "invalid notebook: no list of cells (nbformat 4 expected)"),
        ('{"cells": [{"cell_type": "code", "source": 5}]}', "invalid notebook: the source of cell 1 is not text"),
        ('{"cells": ["a"]}', "invalid notebook: cell 1 is not an object"),
        ("[" * 100_000 + "]" * 100_000, "invalid notebook: nested too deeply"),
    ],
)
def test_a_file_that_is_no_notebook_is_skipped_with_the_reason(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / "bad.ipynb").write_text(content, encoding="utf-8")
    (tmp_path / "good.md").write_text("still read", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert corpus.skipped == [("bad.ipynb", reason)]
    assert [chunk.text for chunk in corpus.chunks] == ["still read"]
    assert corpus.summary() == "1 chunk from 1 file; 1 skipped (1 invalid notebook)"


def test_line_numbers_point_at_the_lines_of_the_file(tmp_path: Path) -> None:
    lines = [f"line {n:03d} of the maintenance log" if n % 9 else "" for n in range(1, 201)]
    lines[136] = "MARKER-137 the seal was replaced"
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    chunks = load_corpus(tmp_path, chunk_chars=300, overlap_chars=60).chunks
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.lines is not None
        first, last = chunk.lines
        assert chunk.text == "\n".join(lines[first - 1 : last]).strip()
        assert chunk.cite == f"log.txt:{first}-{last}"
    with_marker = [chunk for chunk in chunks if "MARKER-137" in chunk.text]
    assert with_marker
    for chunk in with_marker:
        assert chunk.lines is not None
        assert chunk.lines[0] <= 137 <= chunk.lines[1]
    # Consecutive chunks share whole lines.
    for before, after in pairwise(chunks):
        assert before.lines is not None
        assert after.lines is not None
        assert after.lines[0] <= before.lines[1] + 1
        assert after.lines[0] > before.lines[0]


def test_a_five_megabyte_file_on_one_line_is_chunked_whole(tmp_path: Path) -> None:
    (tmp_path / "one-line.txt").write_text("x" * 5_000_000, encoding="utf-8")
    corpus = load_corpus(tmp_path)  # the default limits: 5 MB is allowed
    # Hard cuts every 1200 characters, 200 back: 1000 new characters per chunk, so chunk k starts at
    # 1000 k and the last is the first to reach the end: k = 4999, 1000 characters long.
    assert len(corpus.chunks) == 5000
    assert [len(chunk.text) for chunk in corpus.chunks] == [1200] * 4999 + [1000]
    assert all(chunk.lines == (1, 1) for chunk in corpus.chunks)
    assert corpus.chunks[-1].cite == "one-line.txt:1"


def test_the_file_limit_stops_reading_and_says_where(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text(f"text of {name}", encoding="utf-8")
    corpus = load_corpus(tmp_path, max_files=2)
    assert [chunk.source for chunk in corpus.chunks] == ["a.txt", "b.txt"]
    assert corpus.skipped == [("c.txt", "not read, nor any file after it: the limit of 2 files was reached")]
    assert corpus.summary() == "2 chunks from 2 files; stopped early: the limit of 2 files was reached"


def test_the_total_byte_limit_stops_reading(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("y" * 600, encoding="utf-8")
    corpus = load_corpus(tmp_path, max_total_bytes=1500)
    assert corpus.files == 2
    assert corpus.skipped == [("c.txt", "not read, nor any file after it: the limit of 1.5 KB in all was reached")]
    assert corpus.summary().endswith("; stopped early: the limit of 1.5 KB in all was reached")


def test_a_file_just_over_the_limit_shows_exact_sizes(tmp_path: Path) -> None:
    (tmp_path / "edge.txt").write_text("z" * 3001, encoding="utf-8")
    corpus = load_corpus(tmp_path, max_file_bytes=3000)
    assert corpus.skipped == [("edge.txt", "too large (3,001 bytes > 3,000 bytes)")]


@pytest.mark.timeout(20)
@needs_fifo
def test_a_fifo_named_directly_is_skipped_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    corpus = load_corpus([fifo, "a text as well"])
    assert corpus.skipped == [(str(fifo), "not a regular file")]
    assert [chunk.source for chunk in corpus.chunks] == ["text 2"]


def test_a_file_named_directly_is_read_whatever_its_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.weird").write_text("named on purpose", encoding="utf-8")
    (tmp_path / "other.weird").write_text("not in a folder walk", encoding="utf-8")
    assert [chunk.text for chunk in load_corpus(str(tmp_path / "notes.weird")).chunks] == ["named on purpose"]
    folder = load_corpus(tmp_path)
    assert folder.chunks == []
    assert folder.summary() == "0 chunks from 0 files; 2 files of other types ignored"


def test_files_without_an_extension_that_are_text_by_convention_are_read(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("read me", encoding="utf-8")
    (tmp_path / "Makefile").write_text("all:\n\techo hi\n", encoding="utf-8")
    (tmp_path / "data").write_bytes(b"anything")
    corpus = load_corpus(tmp_path)
    assert [chunk.source for chunk in corpus.chunks] == ["Makefile", "README"]
    assert corpus.other_types == 1


def test_a_bom_is_not_part_of_the_text(tmp_path: Path) -> None:
    (tmp_path / "bom.md").write_bytes("\ufeffTitle\n".encode())
    assert [chunk.text for chunk in load_corpus(tmp_path).chunks] == ["Title"]


@needs_symlinks
def test_the_same_file_reached_twice_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("only once", encoding="utf-8")
    os.symlink(tmp_path / "a.md", tmp_path / "b.md")  # a link to a file is followed
    corpus = load_corpus(tmp_path)
    assert [chunk.text for chunk in corpus.chunks] == ["only once"]
    assert corpus.skipped == [("b.md", "same file as a.md")]
    assert corpus.summary() == "1 chunk from 1 file; 1 skipped (1 duplicate)"


@needs_symlinks
def test_a_link_to_a_folder_named_directly_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.md").write_text("through the link", encoding="utf-8")
    os.symlink(tmp_path / "real", tmp_path / "linked")
    assert [chunk.source for chunk in load_corpus(tmp_path / "linked").chunks] == ["a.md"]


def test_several_folders_name_their_files_with_the_folder_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "README.md").write_text(f"readme of {folder}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus(["one/", Path("two"), "a text"])
    assert [(chunk.source, chunk.text) for chunk in corpus.chunks] == [
        ("one/README.md", "readme of one"),
        ("two/README.md", "readme of two"),
        ("text 3", "a text"),
    ]
    assert corpus.summary() == "3 chunks from 2 files and 1 text"
    # One folder: paths relative to it.
    assert [chunk.source for chunk in load_corpus("one").chunks] == ["README.md"]


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root reads everything")
def test_an_unreadable_file_is_skipped_with_the_system_reason(tmp_path: Path) -> None:
    locked = tmp_path / "locked.md"
    locked.write_text("private", encoding="utf-8")
    locked.chmod(0)
    try:
        corpus = load_corpus(tmp_path)
    finally:
        locked.chmod(0o600)
    assert corpus.skipped == [("locked.md", "unreadable: Permission denied")]


def test_a_file_that_fails_to_open_is_skipped_with_the_system_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as above, for runs as root (which reads everything): open() itself refuses."""
    (tmp_path / "a.md").write_text("readable", encoding="utf-8")
    (tmp_path / "b.md").write_text("private", encoding="utf-8")
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object) -> int:
        if str(path).endswith("b.md"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    corpus = load_corpus(tmp_path)
    monkeypatch.undo()
    assert [chunk.text for chunk in corpus.chunks] == ["readable"]
    assert corpus.skipped == [("b.md", "unreadable: Permission denied")]
    assert corpus.summary() == "1 chunk from 1 file; 1 skipped (1 unreadable)"


# --- what docs may be ---------------------------------------------------------------------


def test_a_plain_string_is_one_text() -> None:
    corpus = load_corpus("The valve opens at 3 bar.\nIt closes at 1 bar.")
    assert corpus.chunks == [Chunk("The valve opens at 3 bar.\nIt closes at 1 bar.", "text 1", 1, None)]
    assert corpus.chunks[0].cite == "text 1"
    assert corpus.summary() == "1 chunk from 1 text"


def test_a_long_text_is_cited_by_chunk_number() -> None:
    chunks = load_corpus(numbered_prose(20), chunk_chars=300, overlap_chars=50).chunks
    assert len(chunks) > 3
    assert [chunk.cite for chunk in chunks[:3]] == ["text 1", "text 1 #2", "text 1 #3"]
    assert all(chunk.lines is None for chunk in chunks)


def test_a_string_naming_a_file_reads_it_and_keeps_the_name_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "guide.md").write_text("# Guide\n\nUse it.\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    corpus = load_corpus("~/guide.md")
    assert [(chunk.source, chunk.cite) for chunk in corpus.chunks] == [("~/guide.md", "~/guide.md:1-3")]
    assert load_corpus(Path("~/guide.md")).chunks[0].text == "# Guide\n\nUse it."


def test_a_list_mixes_texts_and_paths_numbered_by_position(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("from the file", encoding="utf-8")
    corpus = load_corpus(("first text", tmp_path / "a.md", "", "fourth text"))
    assert [(chunk.source, chunk.text) for chunk in corpus.chunks] == [
        ("text 1", "first text"),
        (str(tmp_path / "a.md"), "from the file"),
        ("text 4", "fourth text"),  # the blank third text gives no chunk, but keeps its number
    ]
    assert corpus.texts == 3
    assert corpus.files == 1


def test_a_dict_names_its_texts() -> None:
    corpus = load_corpus({"pump manual": "Prime before use.", "valve/notes.md": "Opens at 3 bar."})
    assert [(chunk.source, chunk.cite, chunk.text) for chunk in corpus.chunks] == [
        ("pump manual", "pump manual", "Prime before use."),
        ("valve/notes.md", "valve/notes.md", "Opens at 3 bar."),  # a dict's values are always texts
    ]


class SeriesLike:
    """Just what load_corpus uses of a pandas Series."""

    def __init__(self, values: list[object], index: list[object]) -> None:
        self.values = values
        self.index = index

    def items(self) -> Iterator[tuple[object, object]]:
        return zip(self.index, self.values, strict=True)


def test_a_series_like_object_gives_one_text_per_row() -> None:
    corpus = load_corpus(SeriesLike(["first review", "second review"], ["r1", 7]))
    assert [(chunk.source, chunk.text) for chunk in corpus.chunks] == [
        ("row r1", "first review"),
        ("row 7", "second review"),
    ]
    assert corpus.summary() == "2 chunks from 2 texts"


def test_a_series_like_object_with_a_number_is_refused_naming_the_row() -> None:
    with pytest.raises(ParameterError, match=r"Row 7 of docs is int, not text: .*\.astype\(str\)"):
        load_corpus(SeriesLike(["fine", 42], ["r1", 7]))


def test_a_pandas_series_gives_one_text_per_row() -> None:
    pd = pytest.importorskip("pandas")
    corpus = load_corpus(pd.Series(["alpha text", "beta text"], index=[10, 20]))
    assert [(chunk.source, chunk.text) for chunk in corpus.chunks] == [
        ("row 10", "alpha text"),
        ("row 20", "beta text"),
    ]
    assert corpus.texts == 2


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_pandas_series_with_missing_values_is_refused_with_dropna(missing: object) -> None:
    pd = pytest.importorskip("pandas")
    with pytest.raises(ParameterError, match=r"Row b of docs is missing .*\.dropna\(\)"):
        load_corpus(pd.Series(["fine", missing], index=["a", "b"]))


def test_a_pandas_string_series_with_na_is_refused_with_dropna() -> None:
    pd = pytest.importorskip("pandas")
    with pytest.raises(ParameterError, match=r"Row 1 of docs is missing .*\.dropna\(\)"):
        load_corpus(pd.Series(["fine", None], dtype="string"))


def test_a_dataframe_is_refused_with_how_to_pick_its_column() -> None:
    pd = pytest.importorskip("pandas")
    with pytest.raises(ParameterError, match=r"DataFrame: pass the column .* df\['text'\]"):
        load_corpus(pd.DataFrame({"text": ["a"]}))


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (5, r"docs must be a text, a path .* not int\."),
        (None, r"docs must be a text, a path .* not NoneType\."),
        ({"a", "b"}, r"docs must be .* not set\."),
        (["fine", None], r"docs\[1\] is NoneType: a list given as docs holds texts and paths"),
        (["fine", ["nested"]], r"docs\[1\] is list"),
        ({"name": 3}, r"docs\['name'\] is int, not text"),
        (b"bytes", r"docs is bytes: decode them"),
    ],
)
def test_what_docs_cannot_be_is_refused_saying_what_it_can_be(docs: object, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        load_corpus(docs)


@pytest.mark.parametrize(
    "typo",
    [
        "notes/guide.md",
        "guide.md",
        "My Notes.txt",
        "~/missing-folder",
        "./data",
        "/no/such/place",
        "reports/2024",
        "C:\\Users\\me\\notes",
    ],
)
def test_a_string_that_looks_like_a_missing_path_is_refused(
    typo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParameterError, match=r"No file or folder named .*check the path .*pass \{'name': text\}"):
        load_corpus(typo)
    with pytest.raises(ParameterError, match="No file or folder named"):
        load_corpus(["a fine text", typo])


def test_a_url_is_refused_saying_that_files_are_local() -> None:
    with pytest.raises(ParameterError, match="nbllm reads local files"):
        load_corpus("https://example.com/guide.html")


@pytest.mark.parametrize(
    "text",
    [
        "Cats and/or dogs make good pets.",  # a separator, but words around it
        "Version 2.0 was released.",  # a dot, but no known extension
        "See notes/guide.md for the details\nand the rest of the manual.",  # several lines: never a path
        "   ",
    ],
)
def test_texts_that_do_not_look_like_paths_are_texts(text: str) -> None:
    corpus = load_corpus(text)
    assert [chunk.text for chunk in corpus.chunks] == ([text.strip()] if text.strip() else [])
    assert corpus.texts == 1


def test_a_missing_pathlib_path_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "guide.md"
    with pytest.raises(ParameterError, match=re.escape(f"No file or folder named {str(missing)!r}")):
        load_corpus(missing)
    with pytest.raises(ParameterError, match="No file or folder named"):
        load_corpus([missing])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"chunk_chars": 50}, "chunk_chars must be at least 100, not 50"),
        ({"chunk_chars": 1.5}, "chunk_chars must be a whole number, not float"),
        ({"chunk_chars": True}, "chunk_chars must be a whole number, not bool"),
        ({"overlap_chars": -1}, "overlap_chars must be at least 0, not -1"),
        ({"overlap_chars": 600}, r"overlap_chars must be less than half of chunk_chars \(1200\), not 600"),
        ({"max_files": 0}, "max_files must be at least 1, not 0"),
        ({"max_file_bytes": "5MB"}, "max_file_bytes must be a whole number, not str"),
        ({"max_total_bytes": 0}, "max_total_bytes must be at least 1, not 0"),
    ],
)
def test_bad_limits_are_refused(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        load_corpus("some text", **arguments)  # type: ignore[arg-type]


# --- chunking -----------------------------------------------------------------------------


def test_blank_text_gives_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text(" \n\n\t \r\n") == []


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    text = numbered_prose(30, lines_per_paragraph=3, words_per_line=6)  # paragraphs of ~125 characters
    chunks = chunk_text(text, chunk_chars=400, overlap_chars=100)
    assert_well_formed(text, chunks, 400, 100)
    # Every chunk but the last ends where a paragraph ends.
    for _, end in spans(text, chunks)[:-1]:
        assert text[end : end + 2] == "\n\n"


def test_lines_are_kept_whole_when_paragraphs_are_too_long() -> None:
    text = numbered_prose(2, lines_per_paragraph=60, words_per_line=6)
    chunks = chunk_text(text, chunk_chars=300, overlap_chars=80)
    assert_well_formed(text, chunks, 300, 80)
    for start, end in spans(text, chunks):
        assert start == 0 or text[start - 1] == "\n"
        assert end == len(text) or text[end] == "\n"
    # The overlap is whole lines: each chunk starts with a line the one before ended with.
    for (before, *_), (after, *_) in pairwise(chunks):
        assert after.split("\n")[0] in before.split("\n")


def test_one_long_line_is_cut_between_words() -> None:
    text = numbered_prose(1, lines_per_paragraph=1, words_per_line=2000)
    words = set(text.split())
    chunks = chunk_text(text, chunk_chars=500, overlap_chars=120)
    assert_well_formed(text, chunks, 500, 120)
    for piece, first, last in chunks:
        assert set(piece.split()) <= words  # no word cut in two
        assert (first, last) == (1, 1)
    for (before, *_), (after, *_) in pairwise(chunks):
        assert after.split()[0] in before.split()  # they overlap


def test_text_without_spaces_is_cut_hard_with_the_exact_overlap() -> None:
    text = "".join(f"{n:04d}" for n in range(2000))  # 8000 characters, all distinct 4-grams
    chunks = chunk_text(text, chunk_chars=1000, overlap_chars=100)
    assert_well_formed(text, chunks, 1000, 100)
    assert [len(piece) for piece, _, _ in chunks[:-1]] == [1000] * (len(chunks) - 1)
    assert len(chunks) == 9  # 900 new characters per chunk
    for (before, *_), (after, *_) in pairwise(chunks):
        assert after[:100] == before[-100:]


def test_no_overlap_means_chunks_that_meet() -> None:
    text = numbered_prose(10)
    chunks = chunk_text(text, chunk_chars=200, overlap_chars=0)
    assert_well_formed(text, chunks, 200, 0)
    located = spans(text, chunks)
    for (_, end), (start, _) in pairwise(located):
        assert start >= end


def test_a_long_run_of_blanks_is_not_carried_into_chunks() -> None:
    text = "first part " * 30 + " " * 100_000 + "\n" * 50_000 + "second part " * 30
    chunks = chunk_text(text, chunk_chars=200, overlap_chars=50)
    assert all(len(piece) <= 200 and piece == piece.strip() for piece, _, _ in chunks)
    assert "".join(piece for piece, _, _ in chunks).count("first part") >= 30
    last_first_part = [c for c in chunks if "first" in c[0]][-1]
    first_second_part = next(c for c in chunks if "second" in c[0])
    assert "second" not in last_first_part[0]
    assert "first" not in first_second_part[0]
    assert first_second_part[1] == 50_001  # the line after the 50,000 line breaks


def test_windows_and_old_mac_line_ends_count_as_lines() -> None:
    chunks = chunk_text("one\r\ntwo\r\n\r\nthree\rfour")
    assert chunks == [("one\ntwo\n\nthree\nfour", 1, 5)]


def test_chunks_are_stripped_but_lines_stay_right() -> None:
    chunks = chunk_text("\n\n   \n  indented start\nend  \n\n\n")
    assert chunks == [("indented start\nend", 4, 5)]


def test_chunk_text_checks_its_arguments() -> None:
    with pytest.raises(ParameterError, match="chunk_chars must be at least 100"):
        chunk_text("text", chunk_chars=10, overlap_chars=0)


# --- the records --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "cite"),
    [
        (Chunk("t", "guide.md", 3, (12, 30)), "guide.md:12-30"),
        (Chunk("t", "guide.md", 1, (12, 12)), "guide.md:12"),
        (Chunk("t", "notes.ipynb cell 5", 1), "notes.ipynb cell 5"),
        (Chunk("t", "text 3", 2), "text 3 #2"),
        (Chunk("t", "row 17", 1), "row 17"),
    ],
)
def test_cites(chunk: Chunk, cite: str) -> None:
    assert chunk.cite == cite


def test_a_chunk_is_immutable_and_hashable() -> None:
    chunk = Chunk("t", "text 1", 1)
    with pytest.raises(AttributeError):
        chunk.text = "changed"  # type: ignore[misc]
    assert len({chunk, Chunk("t", "text 1", 1)}) == 1


def test_the_summary_counts_kinds_of_skips_and_says_nothing_that_is_zero() -> None:
    corpus = Corpus(
        chunks=[Chunk("t", "a.md", 1, (1, 1))],
        skipped=[
            ("b.txt", "binary"),
            ("c.txt", "too large (12.3 MB > 5 MB)"),
            ("d.txt", "binary"),
            ("e.md", "unreadable: Permission denied"),
        ],
        files=1,
    )
    assert corpus.summary() == "1 chunk from 1 file; 4 skipped (2 binary, 1 too large, 1 unreadable)"
    assert Corpus(chunks=[]).summary() == "0 chunks from 0 files"
