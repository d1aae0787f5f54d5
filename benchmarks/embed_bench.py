#!/usr/bin/env python3
"""``nbllm.embed`` on the default embedding model (all-MiniLM-L6-v2, GGUF F16): how fast, against
llama.cpp's own ``llama-embedding`` built from the same sdist with the same flags
(benchmarks/llama_tools.py), on 1,000 short, varied, distinct texts (5-20 words, generated
deterministically). Two threads for everyone; speeds in texts per second.

a. ``nbllm.embed(texts, progress=False)`` with the embedding cache off, on a loaded model (the
   first call loads: timed apart), as nbllm loads it: a context (batch, micro-batch) of
   ``EMBEDDING_BATCH`` tokens, flash attention, texts packed ``PACK_TOKENS`` tokens a decode.
   ``--rounds`` runs, each followed by b.
b. ``llama-embedding`` on the same GGUF file and texts (``-f``: one text a line; mean pooling,
   euclidean normalization, flash attention as nbllm). It packs texts up to its batch size, so it
   runs twice: with ``-c/-b/-ub PACK_TOKENS`` (the same decodes as nbllm) and with
   ``EMBEDDING_BATCH`` (the same context); the headline compares with the faster. Each run is a
   fresh process, so its model load is subtracted: the headline is the process's wall time minus
   the ``load time`` llama.cpp prints (``llama_perf_context_print`` on stderr, ``-lv 4``), which
   runs from the start of the model load to the end of the warm-up decode; what remains is
   process start and exit, reading and tokenizing the texts, the decodes, and writing the
   vectors out (``--embd-output-format array``, parsed here). Also reported: its ``total time``
   (from the end of the warm-up to that print: no process start or exit). Its ``prompt eval
   time`` is not used: on this build it misses most of the decode time (0.7 s of 8 s in a check,
   where perf showed the time in ggml's matrix products).
   Goal: nbllm >= 0.9x llama-embedding (the median of the rounds' ratios). The vectors must
   agree (cosine >= 0.999 for every text), so that both did the same work (same tokens, pooling,
   normalization).
c. The first ``--single`` texts, one ``nbllm.embed`` call each (cache off), after a in every
   round. Goal: a >= 3x c (the median of the rounds' ratios).
d. The cache on (a fresh temporary folder): one call fills it, the next ``--rounds`` are timed.
   Goal: >= 100x a.
e. Other settings (``--sweep-rounds`` rounds, interleaved with a/b's; patched in this process:
   ``EMBEDDING_BATCH``, ``PACK_TOKENS``, and flash attention in the engine's load settings; the
   model reloads). llama.cpp's attention covers the whole micro-batch, masked per sequence, so
   packing a thousand short texts into 2048-token decodes costs far more than into small ones.
   Both tools packing as much as the batch holds: 2048 without flash attention (nbllm's
   settings before this benchmark), 512 and 256 with and without; then nbllm alone with a
   context of 2048 or 512 and small packs: the cost follows the tokens per decode, not the
   context. EMBEDDING_BATCH is also the longest text nbllm accepts (capped by the model's
   training context, 512 for MiniLM), so below 512 it would refuse texts the model can read;
   PACK_TOKENS, apart from it, does not. This sweep chose nbllm's defaults (EMBEDDING_BATCH 512,
   flash attention on for embedding models, PACK_TOKENS 256); results/embed_bench_sweep.log is
   the first run, when they were 2048, off and 2048 (its first round was contended).

The machine may be shared, and llama.cpp's threads wait for each other hundreds of times a
decode: a process that takes one of the two CPUs can make a run several times slower. So each
round measures every setting (a contended stretch is spread over them rather than hitting one),
every median comes with its spread (max - min over rounds, in percent of the median), and every
run with what other processes used meanwhile (``others``: CPUs busy outside this process and its
children, from /proc/stat); runs where that exceeded 0.25 CPU are counted (``contended_runs``).

Run: .venv/bin/python benchmarks/embed_bench.py [--rounds 3] [--sweep-rounds 2] [--texts 1000]
     [--single 200] [--no-sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_tools import ensure_tools

import nbllm
import nbllm.backends.llama_cpp_embed as embed_module
import nbllm.engine.engine as engine_module
from nbllm.host.default_embedding_model import default_embedding_model_path

THREADS = 2
EMBEDDING_BATCH = engine_module.EMBEDDING_BATCH  # nbllm's defaults, before any patch
PACK_TOKENS = embed_module.PACK_TOKENS
CONTENDED = 0.25  # CPUs used by other processes during a run, above which it is counted as contended
# (batch, tokens packed per decode, flash attention, llama-embedding's batch sizes: none = nbllm alone)
SWEEP = (
    (2048, 2048, False, (2048,)),
    (512, 512, False, (512,)),
    (512, 512, True, (512,)),
    (256, 256, False, (256,)),
    (256, 256, True, (256,)),
    (2048, 256, True, ()),
    (512, 128, True, ()),
)

WORD_LINES = (
    "the a of and to in on with for from by about under over after before near between across",
    "river mountain city village garden kitchen library market harbor station forest desert ocean",
    "bridge tower museum school hospital office factory farm island valley castle road window door",
    "teacher doctor farmer pilot child student engineer painter sailor baker musician scientist",
    "dog cat horse bird fish whale tiger rabbit fox owl bee spider dragon robot computer phone",
    "car train bicycle ship plane rocket camera guitar piano book letter map clock lamp chair",
    "runs walks reads writes sings paints builds opens closes finds loses sells buys cooks",
    "eats drinks watches hears remembers forgets explains discovers measures repairs carries",
    "quickly slowly quietly loudly carefully happily rarely often always never suddenly",
    "red blue green old young tall small bright dark warm cold ancient modern strange quiet busy",
    "morning evening night winter summer spring autumn yesterday tomorrow today weekend holiday",
    "rain snow wind sunlight storm cloud fog thunder shadow silence music story question answer",
    "price budget report meeting contract invoice server database network algorithm model error",
    "coffee tea bread soup cheese apple orange rice chocolate pepper salt sugar honey butter",
)
WORDS = [word for line in WORD_LINES for word in line.split()]


def make_texts(count: int, seed: int = 20240601) -> list[str]:
    """``count`` distinct sentences of 5-20 words (some with a number or a comma), always the same."""
    rng = random.Random(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        words = rng.choices(WORDS, k=rng.randint(5, 20))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 1999)))
        if rng.random() < 0.3:
            words[rng.randrange(len(words) - 1)] += ","
        text = " ".join(words).capitalize() + rng.choice(".?!")
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"spread {100 * (max(values) - min(values)) / median:.0f}%"


def _busy_and_own() -> tuple[float, float]:
    """CPU seconds: all CPUs busy (/proc/stat), and this process with its waited-for children."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


def timed(function: Callable[[], Any]) -> tuple[float, Any, float]:
    """Seconds, the result, and the CPUs other processes kept busy meanwhile."""
    busy, own = _busy_and_own()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    busy_after, own_after = _busy_and_own()
    return seconds, result, max(0.0, (busy_after - busy) - (own_after - own)) / seconds


class DecodeTimer:
    """Seconds spent inside ``llama_decode`` (nbllm's embedding path calls it through the module)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._decode = llama_cpp.llama_decode

    def __enter__(self) -> DecodeTimer:
        def decode(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return self._decode(*args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        llama_cpp.llama_decode = decode
        return self

    def __exit__(self, *exc: object) -> None:
        llama_cpp.llama_decode = self._decode


_base_load_settings = engine_module.Engine.base_load_settings
_flash: dict[str, bool | None] = {"embedding": None}  # None: as the engine decides


def _load_settings(self: engine_module.Engine, spec: Any, info: Any) -> Any:
    settings = _base_load_settings(self, spec, info)
    if info.pooling is not None and _flash["embedding"] is not None:
        settings = dataclasses.replace(settings, flash_attention=_flash["embedding"])
    return settings


engine_module.Engine.base_load_settings = _load_settings  # type: ignore[method-assign]


def setup_nbllm(batch: int, pack: int, flash: bool | None) -> tuple[float, Any]:
    """Patch, configure and load; the first call's seconds (the load and one text), and the load settings."""
    engine_module.EMBEDDING_BATCH = batch  # read when load settings are made: a change reloads the model
    embed_module.PACK_TOKENS = pack  # read at each call
    _flash["embedding"] = flash
    nbllm.configure(performance={"threads": THREADS, "batch_size": 512, "gpu_layers": 0, "flash_attention": False})
    nbllm.unload()
    seconds = timed(lambda: nbllm.embed("A first text loads the model.", progress=False))[0]
    (resident,) = nbllm.get_engine().registry.resident()
    assert resident.settings.batch_size == batch, resident.settings
    assert flash is None or resident.settings.flash_attention == flash, resident.settings
    return seconds, resident.settings


def run_nbllm(texts: list[str]) -> dict[str, Any]:
    with DecodeTimer() as decodes:
        seconds, vectors, others = timed(lambda: nbllm.embed(texts, progress=False))
    assert vectors.shape[0] == len(texts), vectors.shape
    assert vectors.cached == 0, vectors.cached
    return {"seconds": seconds, "decode_s": decodes.seconds, "decodes": decodes.calls, "tokens": vectors.tokens,
            "others": others, "vectors": np.asarray(vectors)}  # fmt: skip


def run_llama_embedding(tool: Path, model: Path, text_file: Path, batch: int, flash: bool) -> dict[str, Any]:
    command = [str(tool), "-m", str(model), "-f", str(text_file), "-t", str(THREADS), "-tb", str(THREADS),
               "-c", str(batch), "-b", str(batch), "-ub", str(batch), "--pooling", "mean", "--embd-normalize", "2",
               "--embd-output-format", "array", "-fa", "on" if flash else "off", "-ngl", "0", "-lv", "4"]  # fmt: skip
    wall, done, others = timed(lambda: subprocess.run(command, capture_output=True, text=True, check=False))
    if done.returncode != 0:
        raise RuntimeError(f"llama-embedding failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = {}
    for key, pattern in {"load": r"load time =\s*([\d.]+) ms", "total": r"total time =\s*([\d.]+) ms",
                         "tokens": r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens"}.items():  # fmt: skip
        match = re.search(pattern, done.stderr)
        if match is None:
            raise RuntimeError(f"no {key} time in llama-embedding's stderr:\n{done.stderr[-3000:]}")
        found[key] = float(match.group(1))
    out = done.stdout
    return {
        "wall_s": wall,
        "load_s": found["load"] / 1000,
        "seconds": wall - found["load"] / 1000,
        "total_s": found["total"] / 1000,
        "tokens": int(found["tokens"]),
        "decodes": len(re.findall(r"batch_decode: n_tokens", done.stderr)),
        "others": others,
        "vectors": np.asarray(json.loads(out[out.index("[[") : out.rindex("]]") + 2]), dtype=np.float32),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@dataclass
class Setting:
    """One way of loading the model: nbllm's runs, and llama-embedding's at each of ``llama`` batch sizes."""

    batch: int
    pack: int
    flash: bool | None  # None: as nbllm loads it (then read back)
    llama: tuple[int, ...]
    loads: list[float] = field(default_factory=list)
    ours: list[dict[str, Any]] = field(default_factory=list)
    theirs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        pack = f", packs of {self.pack}" if self.pack != self.batch else ""
        return f"batch {self.batch}{pack}, flash attention {'on' if self.flash else 'off'}"

    def run(self, texts: list[str], paths: tuple[Path, Path, Path]) -> None:
        seconds, settings = setup_nbllm(self.batch, self.pack, self.flash)
        self.flash = settings.flash_attention
        self.loads.append(seconds)
        ours = run_nbllm(texts)
        if self.ours:  # only the first round's vectors are kept, for the checks
            ours.pop("vectors")
        self.ours.append(ours)
        line = (
            f"  [{self.label}] nbllm {ours['seconds']:.2f}s ({ours['decode_s']:.2f}s in {ours['decodes']} "
            f"llama_decode; others {ours['others']:.2f} CPU)"
        )
        for batch in self.llama:
            theirs = run_llama_embedding(*paths, batch, bool(self.flash))
            runs = self.theirs.setdefault(batch, [])
            if runs:
                theirs.pop("vectors")
            runs.append(theirs)
            line += (
                f"\n    llama-embedding -b {batch}: wall {theirs['wall_s']:.2f}s - load {theirs['load_s']:.2f}s = "
                f"{theirs['seconds']:.2f}s (total time {theirs['total_s']:.2f}s, {theirs['decodes']} decodes; "
                f"others {theirs['others']:.2f} CPU) | nbllm / it {theirs['seconds'] / ours['seconds']:.2f}"
            )
        print(line, flush=True)

    def summary(self, count: int) -> dict[str, Any]:
        rates = [count / run["seconds"] for run in self.ours]
        runs = [*self.ours, *(run for runs in self.theirs.values() for run in runs)]
        result: dict[str, Any] = {
            "batch": self.batch,
            "packing": self.pack,
            "flash_attention": self.flash,
            "nbllm_load_s": round(statistics.median(self.loads), 3),
            "nbllm_texts_per_s": round(statistics.median(rates), 1),
            "nbllm_rates": [round(r, 1) for r in rates],
            "nbllm_outside_llama_decode_s": round(
                statistics.median(r["seconds"] - r["decode_s"] for r in self.ours), 3
            ),
            "decodes": self.ours[0]["decodes"],
            "tokens": self.ours[0]["tokens"],
            "others_cpu_max": round(max(r["others"] for r in runs), 2),
            "contended_runs": f"{sum(r['others'] > CONTENDED for r in runs)}/{len(runs)}",
            "llama_embedding": {},
        }
        line = f"{self.label}: nbllm {result['nbllm_texts_per_s']:.1f} texts/s ({spread(rates)})"
        for batch, theirs in self.theirs.items():
            their_rates = [count / run["seconds"] for run in theirs]
            ratios = [ours / their for ours, their in zip(rates, their_rates, strict=True)]
            totals = [ours * run["total_s"] / count for ours, run in zip(rates, theirs, strict=True)]
            cos = cosines(self.ours[0]["vectors"], theirs[0]["vectors"])
            assert theirs[0]["tokens"] == self.ours[0]["tokens"], (theirs[0]["tokens"], self.ours[0]["tokens"])
            result["llama_embedding"][batch] = {
                "texts_per_s": round(statistics.median(their_rates), 1),
                "rates": [round(r, 1) for r in their_rates],
                "load_s": round(statistics.median(r["load_s"] for r in theirs), 3),
                "decodes": theirs[0]["decodes"],
                "ratio": round(statistics.median(ratios), 3),
                "ratios": [round(r, 3) for r in ratios],
                "ratio_vs_its_total_time": round(statistics.median(totals), 3),
                "cosine_min": round(float(cos.min()), 6),
            }
            line += (
                f" | llama-embedding -b {batch} {statistics.median(their_rates):.1f} texts/s ({spread(their_rates)}): "
                f"nbllm / it {statistics.median(ratios):.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)}; "
                f"{statistics.median(totals):.2f}x against its total time), cosine min {cos.min():.6f}"
            )
        if self.theirs:
            result["ratio"] = min(r["ratio"] for r in result["llama_embedding"].values())
        print(f"{line} | contended runs {result['contended_runs']}", flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep-rounds", type=int, default=2)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="texts embedded one call each (c)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the other settings (e)")
    args = parser.parse_args()
    started = time.perf_counter()
    tool = ensure_tools()["llama-embedding"]
    model = default_embedding_model_path()
    engine = nbllm.get_engine()
    spec = engine.registry.resolve(engine.settings.embedding_model)
    assert spec.path == model, (spec.path, model)
    texts = make_texts(args.texts)
    words = [len(t.split()) for t in texts]
    print(
        f"{spec.name} ({model.name}), {len(texts)} texts of {min(words)}-{max(words)} words, {THREADS} threads, "
        f"{args.rounds} rounds ({args.sweep_rounds} for e); load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs; {tool}",
        flush=True,
    )
    default = Setting(EMBEDDING_BATCH, PACK_TOKENS, None, tuple(dict.fromkeys((PACK_TOKENS, EMBEDDING_BATCH))))
    sweep = [] if args.no_sweep else [Setting(*setting) for setting in SWEEP]
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "texts.txt"
        text_file.write_text("\n".join(texts), encoding="utf-8")  # no final newline: no empty last text
        nbllm.configure(cache={"enabled": False, "directory": str(Path(tmp) / "prompts")})
        singles: list[float] = []
        for round_number in range(args.rounds):
            print(f"round {round_number + 1}: a/b, nbllm's defaults", flush=True)
            default.run(texts, (tool, model, text_file))
            # c, right after this round's a: the ratio a / c is taken round by round, so that a
            # busy stretch of the machine slows both sides of one ratio rather than one side.
            setup_nbllm(EMBEDDING_BATCH, PACK_TOKENS, None)
            seconds, _, others = timed(lambda: [nbllm.embed(t, progress=False) for t in texts[: args.single]])
            singles.append(args.single / seconds)
            ratio = len(texts) / default.ours[-1]["seconds"] / singles[-1]
            print(f"  c: the first {args.single} texts one call each {singles[-1]:.1f} texts/s "
                  f"(others {others:.2f} CPU) | a / c {ratio:.2f}x", flush=True)  # fmt: skip
            if round_number < args.sweep_rounds and sweep:
                print(f"round {round_number + 1}: e, other settings", flush=True)
                for setting in sweep:
                    setting.run(texts, (tool, model, text_file))
        print("a/b and e, medians:", flush=True)
        results = [setting.summary(len(texts)) for setting in (default, *sweep)]
        for setting, result in zip(sweep, results[1:], strict=True):
            agree = cosines(setting.ours[0]["vectors"], default.ours[0]["vectors"])
            result["cosine_min_vs_a"] = round(float(agree.min()), 6)
        batched = results[0]["nbllm_texts_per_s"]

        single = statistics.median(singles)
        per_round = [len(texts) / run["seconds"] / one for run, one in zip(default.ours, singles, strict=True)]
        a_over_c = statistics.median(per_round)
        print(f"c: one call each {single:.1f} texts/s ({spread(singles)}); a / c = {a_over_c:.2f}x (median of rounds)")

        print("d. the cache on (a fresh folder): one call fills it, the next are timed", flush=True)
        nbllm.configure(cache={"enabled": True})
        nbllm.embed(texts, progress=False)
        cached_rates = []
        for _ in range(args.rounds):
            seconds, vectors, _ = timed(lambda: nbllm.embed(texts, progress=False))
            assert vectors.cached == len(texts), vectors.cached
            cached_rates.append(len(texts) / seconds)
        agree = float(cosines(np.asarray(vectors), default.ours[0]["vectors"]).min())
        cached = statistics.median(cached_rates)
        print(
            f"d: from the cache {cached:.0f} texts/s ({spread(cached_rates)}), {cached / batched:.0f}x a; "
            f"cosine min against a's vectors {agree:.6f}",
            flush=True,
        )
    fastest = max(results, key=lambda r: r["nbllm_texts_per_s"])
    head = results[0]
    print(f"{time.perf_counter() - started:.0f}s in all; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(
        json.dumps(
            {
                "texts": len(texts),
                "threads": THREADS,
                "a_nbllm_texts_per_s": batched,
                "b_llama_embedding_texts_per_s": max(r["texts_per_s"] for r in head["llama_embedding"].values()),
                "a_over_b": head["ratio"],
                "goal_a_over_b": 0.9,
                "cosine_min_a_b": min(r["cosine_min"] for r in head["llama_embedding"].values()),
                "c_one_call_each_texts_per_s": round(single, 1),
                "a_over_c": round(a_over_c, 2),
                "a_over_c_rounds": [round(r, 2) for r in per_round],
                "goal_a_over_c": 3,
                "d_cached_texts_per_s": round(cached, 1),
                "d_over_a": round(cached / batched, 1),
                "goal_d_over_a": 100,
                "contended_runs_a_b": head["contended_runs"],
                "default": head,
                "sweep": results[1:],
                "fastest_nbllm": {key: fastest[key] for key in ("batch", "packing", "flash_attention")}
                | {"texts_per_s": fastest["nbllm_texts_per_s"]},
            }
        )
    )


if __name__ == "__main__":
    main()
