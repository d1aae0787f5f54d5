"""nbllm's own files: written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbllm.core.paths import write_text_atomically


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "index.json"
    write_text_atomically(target, '{"a": 1}')
    write_text_atomically(target, '{"a": 2}')
    assert target.read_text() == '{"a": 2}'
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(target, "\ud800")  # a lone surrogate cannot be encoded: the write fails
    assert target.read_text() == '{"a": 2}', "the old content survives"
    assert [p.name for p in target.parent.iterdir()] == ["index.json"], "no temporary file is left"
