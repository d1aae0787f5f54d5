"""The package's shape, enforced: import-linter's contracts (pyproject.toml, [tool.importlinter]).

They replace a test that grepped source text for import lines and so missed imports inside
functions and whole-module dependencies (engine -> tuner -> plots). Each contract is also shown
to bite: a copy of the package with one deliberate violation must fail it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy under test is found before the installed (editable) package.
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_import_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("shape")
    shutil.copytree(ROOT / "nbllm", target / "nbllm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/units.py", "import plotly", "Nothing below the front ends imports"),
        ("engine/engine.py", "import tqdm", "Nothing below the front ends imports"),
        ("engine/registry.py", "from nbllm.measure import tuner", "Layers"),
        ("core/paths.py", "from nbllm.host import machine", "Layers"),
        ("hub/catalog.py", "import llama_cpp", "Only nbllm.backends imports llama_cpp"),
        ("engine/engine.py", "from nbllm.backends.llama_cpp import LlamaCppBackend", "names a concrete backend"),
        ("engine/pipeline.py", "from nbllm.engine import batching", "No import cycles"),
    ],
)
def test_each_contract_fails_on_a_deliberate_violation(
    package_copy: Path, module: str, line: str, contract: str
) -> None:
    path = package_copy / "nbllm" / module
    original = path.read_text(encoding="utf-8")
    # Inside a function, as a lazy import would be: the contracts must see those too.
    path.write_text(original + f"\n\ndef _violation() -> None:\n    {line}  # noqa\n", encoding="utf-8")
    try:
        result = lint(package_copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode != 0, result.stdout
    broken = [part for part in result.stdout.split("\n\n") if "BROKEN" in part]
    assert any(contract in part for part in broken), result.stdout
