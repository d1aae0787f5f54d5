"""Fuzzing the model-file gate: randomly mutated GGUF headers, each loaded in its own process.

A model file is data from anywhere (a download, a shared drive), so no file may crash or hang
the process that opens it: it either loads and answers, or is refused with an nbllm error that
says what is wrong. Each mutated file is opened in a forked child of one worker process (the
worker has imported nbllm and llama.cpp once, so a case costs milliseconds, not a Python
start); a child killed by a signal is a crash, one still running after the deadline a hang.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nbllm.core.gguf_file import read_gguf

CASES = 200
DEADLINE_SECONDS = 30.0  # per file; a tiny model loads and answers in well under a second

# Runs in a worker process: forks a child per file, which loads the file through the engine
# and generates two tokens; the worker reports how each child ended.
WORKER = r"""
import json, os, signal, sys, time
from nbllm.core.config import Settings
from nbllm.core.errors import NbllmError
from nbllm.engine import Engine
import llama_cpp  # loaded once here, shared by every forked child

deadline = float(sys.argv[1])
settings = Settings().merged({"performance": {"context_size": 256, "threads": 1}, "cache": {"enabled": False}})
outcomes = {}
for path in sys.stdin.read().split():
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            Engine(settings).generate("the", model=path, max_tokens=2, seed=1)
            code = 0
        except NbllmError:
            code = 1
        except BaseException:
            code = 2
        os._exit(code)
    ends = time.monotonic() + deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > ends:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.005)
    if status is None:
        outcomes[path] = "hang"
    elif os.WIFSIGNALED(status):
        outcomes[path] = f"crash (signal {os.WTERMSIG(status)})"
    else:
        outcomes[path] = {0: "loaded fine", 1: "specific error", 2: "unexpected exception"}.get(
            os.WEXITSTATUS(status), f"crash (exit {os.WEXITSTATUS(status)})"
        )
print(json.dumps(outcomes))
"""


def mutate(data: bytes, header_end: int, rng: random.Random) -> bytes:
    """One to four random changes, most of them inside the header (metadata and tensor table)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(8, header_end)  # past magic and version, which have tests of their own
        kind = rng.random()
        if kind < 0.35:  # a flipped byte
            out[at] ^= 1 << rng.randrange(8)
        elif kind < 0.55:  # a count, length or type replaced by an extreme value
            value = rng.choice([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, rng.getrandbits(64)])
            out[at : at + 8] = struct.pack("<Q", value)
        elif kind < 0.7:  # a 4-byte field (a value type, a dimension count, a tensor type)
            out[at : at + 4] = struct.pack("<I", rng.choice([0, 13, 30, 255, 2**31, 2**32 - 1]))
        elif kind < 0.8:  # random bytes over a stretch
            length = rng.randint(1, 64)
            out[at : at + length] = bytes(rng.randrange(256) for _ in range(length))
        elif kind < 0.9:  # a stretch removed (everything after it shifts)
            del out[at : at + rng.randint(1, 64)]
        else:  # a stretch repeated
            length = rng.randint(1, 64)
            out[at:at] = out[at : at + length]
    if rng.random() < 0.1:  # sometimes cut off as well
        del out[rng.randrange(header_end, len(out)) :]
    return bytes(out)


@pytest.mark.timeout(900)
def test_two_hundred_mutated_headers_give_no_crash_and_no_hang(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("NBLLM_FUZZ_SEED", "2026")))  # another seed: other files
    sources = [tiny_models["a"], tiny_models["chat"]]
    files = []
    for index in range(CASES):
        source = sources[index % len(sources)]
        data = source.read_bytes()
        mutated = mutate(data, read_gguf(source).data_offset, rng)
        path = tmp_path / f"fuzz-{index:03d}.gguf"
        path.write_bytes(mutated)
        files.append(path)

    # Two workers, one per core, each with half the files.
    halves = [files[0::2], files[1::2]]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(DEADLINE_SECONDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in halves
    ]
    outcomes: dict[str, str] = {}
    for worker, half in zip(workers, halves, strict=True):
        out, err = worker.communicate("\n".join(map(str, half)), timeout=CASES * DEADLINE_SECONDS)
        assert worker.returncode == 0, err[-3000:]
        outcomes.update(json.loads(out.strip().splitlines()[-1]))

    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.split(" (")[0]] = counts.get(outcome.split(" (")[0], 0) + 1
    print(f"outcomes of {CASES} mutated GGUF files:", counts)
    assert len(outcomes) == CASES
    bad = {Path(p).name: o for p, o in outcomes.items() if o not in ("loaded fine", "specific error")}
    assert not bad, bad
    assert counts.get("specific error", 0) >= CASES // 4, counts  # the mutations did reach the gate
