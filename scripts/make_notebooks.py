#!/usr/bin/env python3
"""Writes notebooks/*.ipynb from the cell lists below, without outputs (kept small in git).

The notebooks are the project's front door; keeping their source here, as plain Python, makes
them reviewable in a diff. Run: .venv/bin/python scripts/make_notebooks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip())


QUICKSTART = [
    md("""
# nbllm quickstart

nbllm runs local GGUF language models (llama.cpp) inside this kernel: a `%%llm` cell magic, line
magics, a Python API, a chat panel, and benchmarks, all on one engine that keeps models loaded and
never computes the same thing twice.

The model used here is the embedded default, **SmolLM2-135M-Instruct** (Q4_1, 98 MB), installed
with nbllm, offline; **Gemma 3 270M** comes with it too (`--model gemma-3-270m`). Both are tiny:
they answer quickly and sometimes oddly. SmolLM2 is the default because it chatted best of the
two (`benchmarks/chat_eval.py`). They are here to show the machinery; `nbllm models recommend`
suggests bigger ones that fit your machine.
"""),
    code("""
import nbllm

%load_ext nbllm
nbllm.models()
"""),
    md("""
## Ask with `%%llm`

The cell body is the prompt. The answer streams in as it is generated, then the stats line says
what it cost. Options: `-n` (max tokens), `-t` (temperature), `--seed`, `--model`, `--system`,
`--format`, `--out`, `--chat` ... — `%llm?` lists them all.
"""),
    code("""
%%llm -n 60 --seed 1
What is Docker?
"""),
    md("""
`{name}` in a prompt is filled from your variables (braces that name nothing are left alone), and
`--out` stores the answer in a variable:
"""),
    code("""
topic = "a container image"
"""),
    code("""
%%llm -n 40 --seed 2 --out answer
In one sentence, what is {topic}?
"""),
    code("""
print(repr(answer))
assert isinstance(answer, str) and answer
"""),
    md("""
## The Python API

The same engine, from Python: `nbllm.chat` for a conversation, `nbllm.generate` to continue text.
Both return the text with its stats, or a stream of pieces with `stream=True`.
"""),
    code("""
reply = nbllm.chat("What is Python?", max_tokens=50, seed=3)
print(reply.text)
print(reply.stats.summary())
"""),
    md("""
A tiny model gets simple facts right, and an answer is only the answer: no "User:" or
"Question:" turns of an imagined conversation after it (stop sequences end it there).
"""),
    code("""
import re

TURN_MARKER = re.compile(r"(?im)^\\s*(?:question|answer|user|assistant)\\s*:|^(?:user|assistant)\\s*$|<\\|im_(?:start|end)\\|>")
capital = nbllm.chat("What is the capital of France?", temperature=0, max_tokens=40)
print(capital.text)
assert "Paris" in capital.text
assert not any(TURN_MARKER.search(text) for text in (answer, reply.text, capital.text))
"""),
    code("""
stream = nbllm.generate("Question: What is a GPU?\\nAnswer:", stream=True, max_tokens=40, seed=4, stop=["\\nQuestion:"])
for piece in stream:
    print(piece, end="", flush=True)
print()
print(stream.stats.details())
"""),
    md("""
## The cache at work

An identical request — same model file, prompt and parameters — comes back from the prompt cache
on disk without running the model:
"""),
    code("""
first = nbllm.chat("Name three uses of Docker.", max_tokens=60, seed=5)
again = nbllm.chat("Name three uses of Docker.", max_tokens=60, seed=5)
print(f"first: {first.stats.total_seconds:.2f} s, again: {again.stats.total_seconds * 1000:.2f} ms, cached: {again.stats.cached}")
assert again.stats.cached and again.text == first.text
"""),
    md("""
Many questions over one long text are the common notebook case. The text is evaluated once; later
questions reuse it from the KV cache — even with other prompts in between:
"""),
    code("""
notes = " ".join([
    "Docker packages an application with its libraries into an image that runs the same everywhere.",
    "Containers share the host kernel, start in milliseconds and are isolated by namespaces and cgroups.",
    "A Dockerfile lists the steps that build an image; layers are cached, so rebuilds are fast.",
    "Volumes keep data outside the container so it survives restarts; networks connect services.",
] * 6)

for question in ["What is a Dockerfile?", "What is the capital of Italy?", "What keeps data across restarts?"]:
    prompt = question if "Italy" in question else f"{notes}\\nQuestion: {question}\\nAnswer:"
    r = nbllm.generate(prompt, max_tokens=24, seed=6, stop=["\\n"], cache=False)
    print(f"{question:35} first token after {r.stats.time_to_first_token:.2f}s, "
          f"{r.stats.reused_prompt_tokens}/{r.stats.prompt_tokens} prompt tokens reused")
assert r.stats.reused_prompt_tokens > 100
"""),
    md("""
## What happened so far

`%llm stats` counts requests, tokens, cache hits and the time they saved; `%llm health` shows the
loaded models with their settings. `%llm config` shows every setting, `%llm config KEY=VALUE`
changes one for this session.
"""),
    code("""
%llm stats
"""),
    code("""
%llm health
"""),
    code("""
%llm config generation.top_k=20
"""),
    md("""
Next: `02_chat.ipynb` (the chat panel with a live throughput chart) and `03_benchmark.ipynb`
(speed measurements with plots). In a terminal, `nbllm run "..."`, `nbllm doctor` and
`nbllm models recommend` do the same jobs.
"""),
]

CHAT = [
    md("""
# The chat panel

`nbllm.ChatPanel()` (or `%llm chat`) opens a conversation with a local model: type, press Enter,
watch the answer stream in and the throughput chart draw it. Stop interrupts a reply, Regenerate
asks again with a new seed, Clear starts over; the model menu switches models, and the Settings
section holds the system prompt and the sampling controls.

The default model, SmolLM2-135M-Instruct, is tiny: keep expectations modest.
"""),
    code("""
import time

import nbllm

# The prompt cache answers a repeated question at once; off here, so every answer below is live.
nbllm.configure(cache={"enabled": False})

panel = nbllm.ChatPanel()
panel
"""),
    md("""
The buttons have Python equivalents, handy in scripts (and for this notebook to run unattended):
"""),
    code("""
panel.send("What is Docker?")
panel.wait(120)
print(panel.history[-1]["content"])
print(panel.status_text)
assert panel.history[-1]["role"] == "assistant" and panel.history[-1]["content"]
"""),
    md("""
A simple fact, asked greedily (temperature 0: the Settings section's slider), and no answer in the
conversation shows a turn marker such as "User:" or "<|im_start|>":
"""),
    code("""
import re

TURN_MARKER = re.compile(r"(?im)^\\s*(?:question|answer|user|assistant)\\s*:|^(?:user|assistant)\\s*$|<\\|im_(?:start|end)\\|>")
answers = [m["content"] for m in panel.history if m["role"] == "assistant"]
panel.clear()
panel.temperature.value = 0
panel.send("What is the capital of France?")
panel.wait(120)
print(panel.history[-1]["content"])
assert "Paris" in panel.history[-1]["content"]
assert not any(TURN_MARKER.search(text) for text in [*answers, panel.history[-1]["content"]])
"""),
    md("""
Generation runs on a worker thread, so the kernel stays free while tokens flow, and Stop works at
once. A long answer, stopped after a second:
"""),
    code("""
panel.send("Tell me a long story about a container ship.")
while panel.current_stream is None or panel.current_stream.tokens < 5:
    time.sleep(0.05)
panel.stop()
panel.wait(60)
print(panel.status_text)
assert "Stopped" in panel.status_text
"""),
    md("""
## The throughput chart on its own

`nbllm.notebook.plots.ThroughputChart` draws any stream: tokens/s while it is generated (left) and per reply
(right). It redraws at most ten times a second, so it costs generation almost nothing.
"""),
    code("""
from IPython.display import display

chart = nbllm.notebook.plots.ThroughputChart()
display(chart)
for piece in chart.watch(nbllm.chat("What is a GPU?", stream=True, max_tokens=60, seed=1)):
    print(piece, end="", flush=True)
assert chart.replies and chart.replies[-1].tokens > 0
"""),
    md("""
## The models panel

`nbllm.ModelsPanel()` lists the catalog and your local models, recommends what fits this machine,
downloads with a progress bar (resumable, checksum-verified) and loads a model with one click.
"""),
    code("""
nbllm.ModelsPanel()
"""),
]

BENCHMARK = [
    md("""
# Benchmarks with plots

`nbllm.bench()` runs llama-bench-style tests — prompt processing of N tokens (pp) and generation of
N tokens (tg), a warm-up and repetitions — and reports mean ± standard deviation in tokens/s, the
guide's rating (under 5 t/s slow ... over 60 excellent) and, for generation, the share of this
machine's memory-bandwidth limit (bandwidth ÷ bytes read per token). It measures the same way
llama.cpp's own `llama-bench` does, so the numbers agree with it.

Small test sizes keep this notebook quick; `nbllm bench` in a terminal defaults to pp512/tg128.
"""),
    code("""
from IPython.display import display

import nbllm
from nbllm.measure.bench import compare, load_results

%load_ext nbllm
from nbllm.notebook.plots import bench_figure, compare_figure, live_bench_chart, threads_figure
"""),
    md("Every timed run appears on the live chart as it finishes:"),
    code("""
live, on_run = live_bench_chart()
display(live)
results = nbllm.bench(pp=128, tg=32, repetitions=3, threads=[1, 2], on_run=on_run)
results
"""),
    code("""
bench_figure(results.records)
"""),
    code("""
threads_figure(results.records)
"""),
    code("""
tg = [r for r in results.records if r["kind"] == "tg"]
for r in tg:
    print(f"{r['test']} with {r['settings']['threads']} threads: {r['tokens_per_second']:.1f} t/s = "
          f"{r['bandwidth_percent']:.0f}% of the bandwidth limit ({r['bandwidth_limit_tokens_per_second']:.0f} t/s)")
assert all(r["bandwidth_percent"] > 0 for r in tg)
"""),
    md("""
## Results as JSON, and comparing two files

Every record carries the model (name, file hash, size, quantization), the settings, the machine
(CPU, cores, RAM, GPU) and the llama.cpp build, so files from two machines can be compared. This is
the guide's `benchmark.py -o results.json`:
"""),
    code("""
results.save("results.json")
"""),
    code("""
%llm bench -p 128 -n 32 -r 3 -t 2 -q -o results-again.json
"""),
    code("""
first, second = load_results("results.json"), load_results("results-again.json")
display(compare(first, second))
compare_figure([r for r in first.records if r["settings"]["threads"] == 2], second.records, labels=("first run", "second run"))
"""),
    md("""
## Tuning

`nbllm.tune()` measures which threads and batch size (and on a GPU, layers and flash attention)
run fastest here, remembers them for this model file and machine, and uses them from then on
wherever the config says "auto":
"""),
    code("""
tuned = nbllm.tune()
print(tuned)
tuned.figure()
"""),
]


def write(name: str, cells: list[nbformat.NotebookNode]) -> None:
    notebook = new_notebook(cells=cells)
    for number, cell in enumerate(notebook.cells):  # stable ids: regenerating changes only what changed
        cell["id"] = f"{Path(name).stem.split('_')[0]}-{number:02d}"
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOKS / name)


if __name__ == "__main__":
    NOTEBOOKS.mkdir(exist_ok=True)
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_chat.ipynb", CHAT)
    write("03_benchmark.ipynb", BENCHMARK)
    print("wrote", ", ".join(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))))
