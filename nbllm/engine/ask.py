"""``nbllm.ask``: a question answered from the user's own documents.

The documents (texts, a DataFrame column, files and folders: core/documents.py) are cut into
chunks, embedded (the embedding cache keeps their vectors, so asking again costs one query's
embedding), and the chunks most similar to the question are given to the chat model as numbered
sources, which it is asked to cite. The answer is an ordinary chat answer — streamed, cached,
counted like any other — that also carries its ``sources``: where each came from (file and lines,
notebook cell, row) and how similar it was to the question.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbllm.core.documents import load_corpus
from nbllm.core.errors import ParameterError
from nbllm.engine.request import Completion
from nbllm.engine.search import Index

if TYPE_CHECKING:
    from nbllm.engine.engine import Engine
    from nbllm.engine.stream import Stream

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite the sources you use by their "
    "number, like [1]. If the sources do not contain the answer, say that they do not."
)


@dataclass(frozen=True)
class Source:
    number: int  # as the model was shown it: [1], [2]...
    cite: str  # where it came from: "guide.md:12-30", "notes.ipynb cell 5", "row 17"
    text: str
    score: float  # cosine similarity to the question

    def __str__(self) -> str:
        return f"[{self.number}] {self.cite}"


def sources_for(
    engine: Engine, question: str, docs: Any, *, k: int, embedding_model: str | None, progress: bool
) -> tuple[Source, ...]:
    """The ``k`` passages of ``docs`` most similar to ``question``."""
    if not isinstance(question, str) or not question.strip():
        raise ParameterError("The question is empty: ask something.")
    if isinstance(docs, Index):
        index = docs
    else:
        corpus = load_corpus(docs)
        if not corpus.chunks:
            raise ParameterError(f"There is no text to search in docs: {corpus.summary()}.")
        index = Index([c.text for c in corpus.chunks], embedding_model, progress=progress, engine=engine)
        index.labels = [c.cite for c in corpus.chunks]
    return tuple(
        Source(number, str(index.labels[hit.position]), index.texts[hit.position], hit.score)
        for number, hit in enumerate(index.hits(question, k), start=1)
    )


def messages_for(question: str, sources: tuple[Source, ...]) -> list[dict[str, str]]:
    passages = "\n\n".join(f"[{s.number}] ({s.cite})\n{s.text}" for s in sources)
    return [{"role": "system", "content": f"{INSTRUCTIONS}\n\n{passages}"}, {"role": "user", "content": question}]


def ask(
    engine: Engine,
    question: str,
    docs: Any,
    *,
    model: str | None,
    embedding_model: str | None,
    k: int,
    stream: bool,
    progress: bool,
    params: dict[str, Any],
) -> Completion | Stream:
    sources = sources_for(engine, question, docs, k=k, embedding_model=embedding_model, progress=progress)
    answer: Completion | Stream = engine.chat(messages_for(question, sources), model=model, stream=stream, **params)
    if isinstance(answer, Completion):
        return dataclasses.replace(answer, sources=sources)
    answer.sources = sources  # the Completion its .result() makes carries them too
    return answer
