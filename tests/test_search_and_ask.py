"""Semantic search and questions over your own documents (issue 17): nbllm.similar, nbllm.Index
(searched, saved, loaded; hostile files refused), the embedding map, nbllm.ask over texts and
folders, and ``%%llm --docs`` in a real IPython shell. Retrieval is checked on the real default
embedding model (random tiny models have no meaning to retrieve by); the answers come from a
tiny chat model, so only their shape is checked."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import nbllm
from nbllm.core.config import Settings
from nbllm.core.errors import ParameterError
from nbllm.engine import Engine
from nbllm.engine.ask import messages_for
from nbllm.notebook.plots import embedding_map, project_2d

ANIMALS = pd.Series(
    ["The cat sleeps on the sofa.", "Stock markets fell sharply today.", "My dog loves long walks.",
     "The central bank raised interest rates.", "A parrot can learn to speak."],
    index=["c", "s", "d", "b", "p"],
)  # fmt: skip


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The real default embedding model; a tiny chat model answers (its text is random)."""
    return settings.merged({"embedding_model": "all-minilm-l6-v2", "performance": {"context_size": 2048}})


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    (folder / "deep").mkdir(parents=True)
    (folder / "baking.md").write_text("# Bread\n\nKnead the dough for ten minutes, then let it rise for an hour.\n")
    (folder / "deep" / "garden.txt").write_text("Water tomato plants in the morning.\nPrune the roses in March.\n")
    (folder / "taxes.py").write_text('"""Income tax is due on the fifteenth of April."""\n')
    (folder / "image.txt").write_bytes(b"\x89PNG\x00\x00binary")
    return folder


def test_similar_ranks_by_meaning_and_keeps_the_series_labels(global_engine: Engine) -> None:
    found = nbllm.similar("pets and animals", ANIMALS, k=3)
    assert list(found.columns) == ["text", "score", "index"]
    assert set(found["index"]) == {"c", "d", "p"}
    assert list(found["score"]) == sorted(found["score"], reverse=True)
    money = nbllm.similar("finance and the economy", list(ANIMALS), k=2)
    assert set(money["index"]) == {1, 3}  # a plain list: positions


def test_an_index_searches_saves_and_loads(global_engine: Engine, tmp_path: Path) -> None:
    index = nbllm.Index(ANIMALS)
    assert len(index) == 5
    assert index.search("a bird that talks", k=1)["index"][0] == "p"
    path = index.save(tmp_path / "animals.npz")
    again = nbllm.Index.load(path)
    assert again.texts == index.texts
    assert again.labels == ["c", "s", "d", "b", "p"]
    assert np.array_equal(again.vectors, index.vectors)
    assert again.search("a bird that talks", k=1)["index"][0] == "p"
    assert not list(tmp_path.glob(".*partial"))


def test_hostile_or_damaged_index_files_are_refused_with_a_reason(global_engine: Engine, tmp_path: Path) -> None:
    good = nbllm.Index(list(ANIMALS)).save(tmp_path / "good.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(tmp_path / "pickled.npz", "w") as target:
        for item in source.namelist():  # the vectors replaced by an object array (a pickle inside)
            data = source.read(item)
            if item == "vectors.npy":
                buffer = BytesIO()
                np.save(buffer, np.array([object()] * 5, dtype=object), allow_pickle=True)
                data = buffer.getvalue()
            target.writestr(item, data)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(tmp_path / "short.npz", "w") as target:
        for item in source.namelist():  # five vectors, two texts
            data = source.read(item)
            if item == "texts.npy":
                buffer = BytesIO()
                np.save(buffer, np.frombuffer(json.dumps(["a", "b"]).encode(), dtype=np.uint8))
                data = buffer.getvalue()
            target.writestr(item, data)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(tmp_path / "huge.npz", "w") as target:
        for item in source.namelist():  # a header that claims a petabyte of vectors
            data = source.read(item)
            if item == "vectors.npy":
                header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 384)}
                buffer = BytesIO()
                np.lib.format.write_array_header_1_0(buffer, header)
                data = buffer.getvalue() + b"\0" * 64
            target.writestr(item, data)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(tmp_path / "extra.npz", "w") as target:
        for item in source.namelist():
            target.writestr(item, source.read(item))
        target.writestr("code.py", "import os")
    for name, words in [("missing.npz", "Cannot read"), ("text.npz", "not an index file"),
                        ("pickled.npz", "not an index file"), ("short.npz", "damaged"),
                        ("huge.npz", "not an index file"), ("extra.npz", "parts are not those")]:  # fmt: skip
        with pytest.raises(ParameterError, match=words):
            nbllm.Index.load(tmp_path / name)


def test_an_index_from_another_model_file_is_not_searched(global_engine: Engine, tmp_path: Path) -> None:
    index = nbllm.Index(list(ANIMALS))
    index._model_id = "0" * 64  # as if the name now named another file
    with pytest.raises(ParameterError, match="another file of all-minilm-l6-v2"):
        index.search("cats")


def test_bad_input_to_search_is_clear(global_engine: Engine) -> None:
    with pytest.raises(ParameterError, match="no texts"):
        nbllm.similar("x", [])
    with pytest.raises(ParameterError, match="not one string"):
        nbllm.Index("just one string")
    with pytest.raises(ParameterError, match="k = 0"):
        nbllm.similar("x", ["a", "b"], k=0)


def test_the_embedding_map_projects_to_two_axes() -> None:
    rng = np.random.default_rng(0)
    vectors = np.vstack([rng.normal(0, 0.1, (10, 8)) + 5, rng.normal(0, 0.1, (10, 8)) - 5])
    coordinates, (first, second) = project_2d(vectors)
    assert coordinates.shape == (20, 2)
    assert first > 0.9 > second  # the two clusters lie along the first axis
    assert np.sign(coordinates[:10, 0]).tolist() == [np.sign(coordinates[0, 0])] * 10
    figure = embedding_map(vectors, labels=["a"] * 10 + ["b"] * 10, hover=[f"t{i}" for i in range(20)])
    assert [trace.name for trace in figure.data] == ["a", "b"]
    assert list(figure.data[1].text) == [f"t{i}" for i in range(10, 20)]
    with pytest.raises(ValueError, match="labels has 3 items for 20 vectors"):
        embedding_map(vectors, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        embedding_map(np.full((3, 4), np.nan))


def test_ask_retrieves_the_right_passage_from_a_folder_and_cites_it(global_engine: Engine, docs: Path) -> None:
    answer = nbllm.ask("How long should bread dough rise?", docs, k=2, max_tokens=8, seed=1)
    assert answer.sources[0].cite == "baking.md:1-3"
    assert answer.sources[0].number == 1
    assert "rise for an hour" in answer.sources[0].text
    assert len(answer.sources) == 2
    assert answer.text is not None
    assert "**Sources**" in answer._repr_markdown_()
    # What the model is given: the instructions, the numbered passages, the question.
    messages = messages_for("q?", answer.sources)
    assert messages[0]["content"].count("[1] (baking.md:1-3)") == 1
    assert messages[1] == {"role": "user", "content": "q?"}
    # Streamed, the sources come with the stream and with its result.
    stream = nbllm.ask("When are taxes due?", docs, k=1, stream=True, max_tokens=4, seed=1)
    assert stream.sources[0].cite.startswith("taxes.py")
    assert stream.result().sources == stream.sources


def test_ask_over_texts_an_index_and_what_has_no_text(global_engine: Engine, tmp_path: Path) -> None:
    answer = nbllm.ask("Which animal can talk?", list(ANIMALS), k=1, max_tokens=4)
    assert answer.sources[0].cite == "text 5"
    index = nbllm.Index(ANIMALS)
    assert nbllm.ask("Which animal can talk?", index, k=1, max_tokens=4).sources[0].cite == "p"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ParameterError, match=r"no text to search in docs: .*1 skipped \(1 binary\)"):
        nbllm.ask("anything?", tmp_path / "empty")
    with pytest.raises(ParameterError, match="question is empty"):
        nbllm.ask("  ", list(ANIMALS))


def test_the_docs_option_answers_from_a_variable_and_lists_the_sources(ip: InteractiveShell, docs: Path) -> None:
    ip.user_ns["notes"] = str(docs)
    with capture_output() as captured:
        ip.run_cell("%%llm --docs notes -n 6 --seed 2\nHow long should bread dough rise?").raise_error()
    shown = [output.data for output in captured.outputs]
    sources = next(data for data in shown if "Sources" in data.get("text/plain", ""))
    assert "[1] baking.md:1-3" in sources["text/plain"]
    assert "<details>" in sources["text/html"]
    result = ip.run_cell("%%llm --docs nothing_here\nA question?")
    assert isinstance(result.error_in_exec, UsageError)
    assert "no variable, file or folder named 'nothing_here'" in str(result.error_in_exec)
    result = ip.run_cell("%%llm --docs notes --raw\nA question?")
    assert "does not go with --raw" in str(result.error_in_exec)


def test_an_index_file_cannot_choose_a_model_file_to_open(global_engine: Engine, tmp_path: Path) -> None:
    index = nbllm.Index(list(ANIMALS))
    index.model = str(tmp_path / "evil.gguf")  # as a crafted file would name it
    path = index.save(tmp_path / "crafted.npz")
    with pytest.raises(ParameterError, match=r"named by its path: load it with Index\.load"):
        nbllm.Index.load(path)
    again = nbllm.Index.load(path, model="all-minilm-l6-v2")  # the caller says which model
    assert again.search("a bird that talks", k=1)["index"][0] == 4
