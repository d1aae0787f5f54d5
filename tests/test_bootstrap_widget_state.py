"""scripts/bootstrap.py turns on JupyterLab's "save widget state" for its environment (the chat
panel's conversation is then saved in the notebook), merging with settings already there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "@jupyter-widgets/jupyterlab-manager:plugin"


def load_bootstrap() -> Any:
    """scripts/bootstrap.py, loaded by path (it is a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("nbllm_bootstrap", ROOT / "scripts" / "bootstrap.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bootstrap() -> Any:
    return load_bootstrap()


def lab_prefix(tmp_path: Path, overrides: str | None = None) -> Path:
    (tmp_path / "share" / "jupyter" / "lab" / "static").mkdir(parents=True)
    if overrides is not None:
        settings = tmp_path / "share" / "jupyter" / "lab" / "settings"
        settings.mkdir()
        (settings / "overrides.json").write_text(overrides, encoding="utf-8")
    return tmp_path


def overrides_of(prefix: Path) -> str:
    return (prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.json").read_text(encoding="utf-8")


def test_a_new_environment_gets_the_setting(bootstrap: Any, tmp_path: Path) -> None:
    prefix = lab_prefix(tmp_path)
    bootstrap.save_widget_state_by_default(prefix)
    assert json.loads(overrides_of(prefix)) == {PLUGIN: {"saveState": True}}
    settings = prefix / "share" / "jupyter" / "lab" / "settings"
    assert [p.name for p in settings.iterdir()] == ["overrides.json"], "no temporary file left"


def test_settings_already_there_are_kept(bootstrap: Any, tmp_path: Path) -> None:
    theirs = {"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}, PLUGIN: {"other": 1}}
    prefix = lab_prefix(tmp_path, json.dumps(theirs))
    bootstrap.save_widget_state_by_default(prefix)
    assert json.loads(overrides_of(prefix)) == {**theirs, PLUGIN: {"other": 1, "saveState": True}}


@pytest.mark.parametrize(
    "existing", [json.dumps({PLUGIN: {"saveState": False}}), "{not json", "[1, 2]", json.dumps({PLUGIN: "x"})]
)
def test_a_users_choice_or_a_file_not_ours_to_read_is_left_as_it_is(
    bootstrap: Any, tmp_path: Path, existing: str
) -> None:
    prefix = lab_prefix(tmp_path, existing)
    bootstrap.save_widget_state_by_default(prefix)
    assert overrides_of(prefix) == existing


def test_no_jupyterlab_no_settings(bootstrap: Any, tmp_path: Path) -> None:
    bootstrap.save_widget_state_by_default(tmp_path)
    assert not (tmp_path / "share").exists()
