"""Every file is checked in Python before llama.cpp sees it; bad files are clear errors, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nbllm.core.errors import InvalidModelFileError, NbllmError
from nbllm.core.gguf_file import read_gguf
from nbllm.engine import Engine


def write_cut(source: Path, target: Path, length: int) -> Path:
    target.write_bytes(source.read_bytes()[:length])
    return target


def test_a_valid_file_reports_its_header(tiny_models: dict[str, Path]) -> None:
    info = read_gguf(tiny_models["a"])
    assert info.architecture == "llama"
    assert info.n_layers == 2
    assert info.context_length == 2048
    assert info.vocab_size > 256
    assert info.quantization == "F32"
    assert info.chat_template is None
    assert read_gguf(tiny_models["chat"]).chat_template
    assert info.tensor("token_embd.weight") is not None
    assert info.data_offset + info.tensor_bytes <= info.file_size


def test_the_gemma_model_header_is_read_in_full(gemma_model_path: Path) -> None:
    info = read_gguf(gemma_model_path)
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.n_layers == 18
    assert info.vocab_size == 262144
    assert info.chat_template is None, "Gemma 3 270M is a base model without a template"


@pytest.mark.parametrize(
    ("fraction", "fragment"),
    [
        (0.00005, "truncated or corrupt"),  # inside the metadata
        (0.5, "truncated"),  # inside the tensor data
        (0.999, "truncated"),  # the last bytes missing
    ],
)
def test_truncated_files_are_refused(
    tiny_models: dict[str, Path], tmp_path: Path, fraction: float, fragment: str
) -> None:
    source = tiny_models["a"]
    cut = write_cut(source, tmp_path / "cut.gguf", max(int(source.stat().st_size * fraction), 40))
    with pytest.raises(InvalidModelFileError) as caught:
        read_gguf(cut)
    assert fragment in str(caught.value)
    assert "download it again" in str(caught.value).lower()


def test_every_possible_cut_of_the_header_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_models["a"].read_bytes()
    data_offset = read_gguf(tiny_models["a"]).data_offset
    target = tmp_path / "cut.gguf"
    for length in range(0, data_offset, 97):
        target.write_bytes(source[:length])
        with pytest.raises(InvalidModelFileError):
            read_gguf(target)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(InvalidModelFileError, match="is empty"):
        read_gguf(empty)


def test_a_directory_is_refused_and_its_gguf_files_named(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(InvalidModelFileError, match=r"is a directory.*tiny-a.gguf"):
        read_gguf(tiny_models["a"].parent)


def test_a_non_gguf_file_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(InvalidModelFileError, match="is not a GGUF file"):
        read_gguf(text)


def test_an_old_ggml_file_gets_conversion_advice(tmp_path: Path) -> None:
    old = tmp_path / "old.bin"
    old.write_bytes(b"tjgg" + bytes(100))
    with pytest.raises(InvalidModelFileError, match="old GGML-format"):
        read_gguf(old)


def test_an_unsupported_version_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(tiny_models["a"].read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad = tmp_path / "v99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFileError, match="version 99"):
        read_gguf(bad)


def test_corrupt_counts_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(tiny_models["a"].read_bytes())
    data[8:16] = struct.pack("<Q", 2**60)  # tensor count
    bad = tmp_path / "count.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFileError, match="implausible tensor count"):
        read_gguf(bad)


def test_random_bytes_after_the_magic_are_refused(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    bad = tmp_path / "noise.gguf"
    for _ in range(20):
        bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(rng.randrange(256) for _ in range(4000)))
        with pytest.raises(InvalidModelFileError):
            read_gguf(bad)


def test_a_tensor_pointing_past_the_end_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_models["a"]
    info = read_gguf(source)
    # Drop the last tensor's final bytes but keep the header intact.
    cut = write_cut(source, tmp_path / "short.gguf", info.file_size - 16)
    with pytest.raises(InvalidModelFileError, match=r"tensor '.*' needs bytes up to"):
        read_gguf(cut)


def test_bad_files_fail_cleanly_through_the_engine_and_it_lives_on(
    engine: Engine, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    source = tiny_models["a"]
    bad_files = [
        write_cut(source, tmp_path / "half.gguf", source.stat().st_size // 2),
        tmp_path,
    ]
    (tmp_path / "garbage.gguf").write_bytes(b"\x00" * 1000)
    bad_files.append(tmp_path / "garbage.gguf")
    for bad in bad_files:
        with pytest.raises(NbllmError):
            engine.generate("the", model=str(bad), max_tokens=2)
    assert engine.registry.resident() == []
    assert engine.generate("the", max_tokens=3, seed=1).stats.completion_tokens > 0


def test_slow_headers_are_remembered_on_disk_for_the_next_process(
    default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbllm.core import gguf_file

    first = read_gguf(default_model_path)
    gguf_file._cache.clear()  # as in a new process
    monkeypatch.setattr(gguf_file, "_parse", lambda *a: pytest.fail("the header was parsed again"))
    again = read_gguf(default_model_path)
    assert again.metadata == first.metadata
    assert again.tensors == first.tensors
    assert again.data_offset == first.data_offset


def test_a_damaged_header_cache_is_ignored(default_model_path: Path) -> None:
    from nbllm.core import gguf_file

    first = read_gguf(default_model_path)
    stat = default_model_path.stat()
    key = (str(default_model_path.resolve()), stat.st_size, stat.st_mtime_ns)
    gguf_file._header_cache_file(key).write_text('{"format": 1, "key": [')
    gguf_file._cache.clear()
    assert read_gguf(default_model_path).tensors == first.tensors


# Found by tests/test_gguf_fuzz.py: metadata llama.cpp acts on without checking, each of which
# aborted or hung the process before the gate looked at it.


def patched(source: Path, target: Path, old: bytes, new: bytes) -> Path:
    data = source.read_bytes()
    assert data.count(old) == 1, old
    target.write_bytes(data.replace(old, new))
    return target


def test_a_vocabulary_naming_a_token_twice_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    bad = patched(tiny_models["a"], tmp_path / "twice.gguf", b"<0x68>", b"<0x69>")
    with pytest.raises(InvalidModelFileError, match=r"tokenizer.ggml.tokens lists 1 token\(s\) twice"):
        read_gguf(bad)


def test_a_byte_fallback_vocabulary_missing_a_byte_token_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    bad = patched(tiny_models["a"], tmp_path / "no-h.gguf", b"<0x68>", b"<0xZZ>")
    with pytest.raises(InvalidModelFileError, match=r"lacks the byte token <0x68> \(1 of 256 missing\)"):
        read_gguf(bad)


def test_a_block_count_beyond_the_tensors_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    key = b"llama.block_count"
    field = key + struct.pack("<I", 4)  # GGUF type 4: uint32, then the value
    bad = patched(
        tiny_models["a"], tmp_path / "layers.gguf", field + struct.pack("<I", 2), field + struct.pack("<I", 2**31 + 2)
    )
    with pytest.raises(InvalidModelFileError, match=r"llama.block_count 2147483650 does not match its 21 tensors"):
        read_gguf(bad)
