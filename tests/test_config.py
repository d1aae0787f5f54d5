"""YAML settings: the guide's defaults, where files are found, and messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import nbllm
from nbllm.core import paths
from nbllm.core.config import (
    Settings,
    find_config_file,
    load_file,
    load_settings,
    parse_assignment,
    parse_bytes,
    validate,
)
from nbllm.core.errors import ConfigError
from nbllm.engine import Engine


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_guides() -> None:
    s = Settings()
    assert s.performance.context_size == 4096
    assert s.performance.batch_size is None, "auto: the tuned value, else the guide's 512"
    assert s.performance.threads is None
    assert s.performance.gpu_layers == -1
    assert (s.performance.use_mmap, s.performance.use_mlock) == (True, False)
    g = s.generation
    assert (g.default_temperature, g.default_max_tokens, g.top_p, g.top_k, g.repeat_penalty) == (
        0.7,
        2048,
        0.95,
        40,
        1.1,
    )
    assert (s.cache.model_cache_size, s.cache.prompt_cache_size) == (2, 100)
    assert s.server.workers == 1
    assert s.default_model == "smollm2-135m"


def test_the_guides_own_config_file_loads(tmp_path: Path) -> None:
    guide = write(
        tmp_path / "config.yaml",
        """
performance:
  context_size: 4096      # Larger = more memory but longer context
  batch_size: 512
  threads: null           # null = auto-detect
  gpu_layers: -1          # -1 = auto-detect, 0 = CPU only
  use_mmap: true
  use_mlock: false
generation:
  default_temperature: 0.7
  default_max_tokens: 2048
  top_p: 0.95
  top_k: 40
  repeat_penalty: 1.1
cache:
  model_cache_size: 2
  prompt_cache_size: 100
server:
  workers: 4
""",
    )
    s = load_file(guide)
    assert s.server.workers == 4
    assert s.source == str(guide)
    assert s.performance.batch_size == 512
    assert s.generation == Settings().generation


def test_search_order_explicit_then_env_then_cwd_then_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBLLM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert find_config_file() is None
    user = paths.user_config_file()
    user.parent.mkdir(parents=True)
    write(user, "cache: {model_cache_size: 4}\n")
    assert find_config_file() == user
    local = write(tmp_path / "nbllm.yaml", "cache: {model_cache_size: 5}\n")
    assert find_config_file() == local
    env = write(tmp_path / "env.yaml", "cache: {model_cache_size: 6}\n")
    monkeypatch.setenv("NBLLM_CONFIG", str(env))
    assert find_config_file() == env
    explicit = write(tmp_path / "explicit.yaml", "cache: {model_cache_size: 7}\n")
    assert load_settings(explicit).cache.model_cache_size == 7
    assert load_settings().cache.model_cache_size == 6


def test_a_missing_explicit_or_env_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_config_file(tmp_path / "nope.yaml")
    monkeypatch.setenv("NBLLM_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="NBLLM_CONFIG points to"):
        find_config_file()
    monkeypatch.setenv("NBLLM_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match="which is a folder, not a YAML file"):
        find_config_file()
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        find_config_file(tmp_path)


def test_misspelled_key_names_the_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "performance:\n  context_sise: 2048\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    message = str(caught.value)
    assert "Unknown key performance.context_sise" in message
    assert str(path) in message
    assert "Did you mean 'context_size'?" in message
    assert "Keys allowed in performance:" in message


def test_misspelled_section_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"Unknown config section 'perfomance'.*Did you mean 'performance'\?"):
        validate({"perfomance": {}})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"performance": {"context_size": -5}}, "performance.context_size = -5"),
        ({"performance": {"context_size": "big"}}, "must be an integer from 16 to"),
        ({"performance": {"threads": True}}, "performance.threads = True"),
        ({"performance": {"use_mmap": "yes"}}, "must be true or false"),
        ({"generation": {"top_p": 1.5}}, "must be a number from 0.0 to 1.0"),
        ({"generation": {"repeat_penalty": 0}}, "above 0.0"),
        ({"cache": {"model_cache_size": 0}}, "cache.model_cache_size = 0"),
        ({"cache": {"model_cache_size": None}}, "cache.model_cache_size = None"),
        ({"cache": {"model_cache_bytes": "lots"}}, "a size such as 512MB"),
        ({"server": {"port": 70000}}, "server.port = 70000"),
        ({"logging": {"llama_cpp": "LOUD"}}, "one of DEBUG, INFO, WARNING, ERROR"),
        ({"performance": [1, 2]}, "must be a mapping"),
        ({"models": {"x": 5}}, "models.x = 5"),
        ({"default_model": ""}, "default_model = ''"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(data, source="test.yaml")
    assert fragment in str(caught.value)


def test_help_text_is_part_of_the_message() -> None:
    with pytest.raises(ConfigError, match=r"\(tokens of context per loaded model\)"):
        validate({"performance": {"context_size": 1}})


def test_bad_yaml_syntax_says_where(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "performance:\n  context_size: 4096\n    batch_size: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert "line 3" in str(caught.value)
    assert "Fix the YAML syntax" in str(caught.value)


def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path: Path) -> None:
    path = write(tmp_path / "twice.yaml", "generation:\n  seed: 1\n  top_k: 20\n  seed: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert str(caught.value).endswith("line 4, column 3: 'seed' is given twice (also at line 2). Keep one of them.")


def test_yaml_merge_keys_still_work_and_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "remote_models:\n"
        "  big: &gpu-box\n    url: http://gpu-box:8080/v1\n    api_key: secret\n    context_size: 8192\n"
        "  small:\n    <<: *gpu-box\n    model: qwen-small\n    context_size: 4096\n"
    )
    small = load_file(write(tmp_path / "merge.yaml", text)).remote_models["small"]
    assert (small.url, small.api_key, small.model, small.context_size) == (
        "http://gpu-box:8080/v1",
        "secret",
        "qwen-small",
        4096,
    )


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_file(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_file(write(tmp_path / "empty.yaml", "")) == Settings()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8_000_000_000), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)), (1024, 1024), ("x", None)],
)
def test_sizes_read_as_bytes(text: object, expected: int | None) -> None:
    assert parse_bytes(text) == expected


def test_models_section_accepts_paths_and_path_mappings() -> None:
    s = validate({"models": {"a": "~/a.gguf", "b": {"path": "/b.gguf"}}})
    assert s.models == {"a": "~/a.gguf", "b": "/b.gguf"}


def test_assignments_parse_as_yaml_values() -> None:
    assert parse_assignment("cache.model_cache_size=3") == {"cache": {"model_cache_size": 3}}
    assert parse_assignment("performance.threads = null") == {"performance": {"threads": None}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("cache.model_cache_size")


def test_configure_applies_a_dict_or_a_file_at_run_time(global_engine: Engine, tmp_path: Path) -> None:
    updated = nbllm.configure(cache={"model_cache_size": 3})
    assert updated.cache.model_cache_size == 3
    assert nbllm.settings().cache.model_cache_size == 3
    assert updated.default_model == "tiny-a", "overrides merge onto the current settings"
    from_file = nbllm.configure(write(tmp_path / "f.yaml", "generation: {top_k: 7}\n"))
    assert from_file.generation.top_k == 7
    assert from_file.cache.model_cache_size == 2, "a file replaces the settings"


def test_configure_rejects_bad_overrides_and_keeps_the_old_settings(global_engine: Engine) -> None:
    before = nbllm.settings()
    with pytest.raises(ConfigError, match="Did you mean 'model_cache_size'"):
        nbllm.configure(cache={"model_cache_sise": 3})
    assert nbllm.settings() == before


def test_an_integer_beyond_any_float_is_a_config_error_not_an_overflow() -> None:
    with pytest.raises(ConfigError, match=r"generation\.top_p = 1000.*must be a number from 0\.0 to 1\.0"):
        validate({"generation": {"top_p": 10**400}})


def test_the_first_problem_reported_is_the_first_one_written() -> None:
    with pytest.raises(ConfigError, match=r"Unknown key performance\.threadz"):
        validate({"performance": {"threadz": 1, "threads": True}})
    with pytest.raises(ConfigError, match=r"performance\.threads = True"):
        validate({"performance": {"threads": True, "threadz": 1}})


def test_numbers_must_be_ints_or_floats_not_other_numeric_types() -> None:
    from decimal import Decimal
    from fractions import Fraction

    for value in (Decimal("0.5"), Fraction(1, 2), True):
        with pytest.raises(ConfigError, match=r"generation\.top_p = "):
            validate({"generation": {"top_p": value}})
    assert validate({"generation": {"top_p": 1}}).generation.top_p == 1.0
