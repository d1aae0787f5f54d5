"""Tiny, real GGUF models for tests and examples.

``make_tiny_model(path)`` writes a llama-architecture model with random weights and a small
SentencePiece-style vocabulary: a few hundred kilobytes, loaded by llama.cpp in milliseconds,
producing (meaningless) text through exactly the same code paths as a real model. Different
``seed``/``n_embd``/``n_layer`` give different files, e.g. to exercise LRU eviction.

Needs the ``gguf`` and ``numpy`` packages (both installed with nbllm).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

# Words give the random model something readable to emit; byte tokens make any text encodable.
_WORDS = tuple(
    """
    the a of and to in is it that was for on are with as be at by this have from or one had
    not but what all were when we there can an your which their said if do will each about
    how up out them then she many some so these would other into has more her two like him
    see time could no make than first been its who now people my made over did down only way
    find use may water long little very after words called just where most know model token
    answer question docker container python notebook cache
    """.split()  # noqa: SIM905 - a paragraph of words reads better than 150 quoted strings
)

GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL (gguf.TokenType values)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [6] * 256  # BYTE
    tokens += ["\u2581" + word for word in _WORDS] + list(_WORDS)
    tokens += ["\u2581", ".", ",", "?", ":", "\n", "User", "Assistant", "\u2581User", "\u2581Assistant"]
    types += [1] * (len(tokens) - len(types))  # NORMAL
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def make_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 2048,
    chat_template: str | None = None,
    name: str | None = None,
    omit_tensors: Collection[str] = (),
) -> Path:
    """Write a tiny random llama-architecture GGUF model to ``path`` and return the path.

    ``omit_tensors`` (names such as ``"blk.1.ffn_down.weight"``) makes a damaged file: its header
    is valid, and llama.cpp refuses to load it for want of those tensors."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or f"tiny-{seed}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def add(name: str, tensor: np.ndarray) -> None:
        if name not in omit_tensors:
            writer.add_tensor(name, tensor)

    add("token_embd.weight", weight(n_vocab, n_embd))
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        add(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(f"{prefix}.attn_q.weight", weight(n_embd, n_embd))
        add(f"{prefix}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        add(f"{prefix}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        add(f"{prefix}.attn_output.weight", weight(n_embd, n_embd))
        add(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(f"{prefix}.ffn_gate.weight", weight(n_ff, n_embd))
        add(f"{prefix}.ffn_up.weight", weight(n_ff, n_embd))
        add(f"{prefix}.ffn_down.weight", weight(n_embd, n_ff))
    add("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    add("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
