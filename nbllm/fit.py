"""How much memory a model needs, computed from its GGUF header before loading it.

The parts, as llama.cpp allocates them:
- weights: the tensor data (memory-mapped, but it must be resident to run at speed);
- KV cache: per layer, context x (K + V) heads x head size, f16 by default;
- compute buffer: dominated by the logits of one micro-batch (n_ubatch x n_vocab floats)
  plus activations; measured on Gemma 3 270M at 514.5 MiB for n_ubatch=512, 128.9 MiB for 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbllm.gguf_file import GGUFInfo
from nbllm.units import format_bytes

KV_BYTES_PER_ELEMENT = 2  # f16 K and V cache, llama.cpp's default
COMPUTE_OVERHEAD = 16 * 2**20


def _per_layer(value: Any, n_layers: int, default: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layers]] + [default] * max(n_layers - len(value), 0)
    return [int(value) if value else default] * n_layers


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def describe(self) -> str:
        return (
            f"{format_bytes(self.total)} ({format_bytes(self.weights)} weights + "
            f"{format_bytes(self.kv_cache)} KV cache + {format_bytes(self.compute)} compute buffers)"
        )


def kv_cache_bytes(info: GGUFInfo, context_size: int) -> int:
    """K and V for every layer; sliding-window layers are counted in full, as llama.cpp allocates them."""
    n_layers = info.n_layers
    n_embd = int(info.arch_get("embedding_length", 0) or 0)
    heads = _per_layer(info.arch_get("attention.head_count"), n_layers, 1)
    kv_heads = _per_layer(info.arch_get("attention.head_count_kv"), n_layers, 0)
    total = 0
    for layer in range(n_layers):
        n_head = max(heads[layer], 1)
        n_head_kv = kv_heads[layer] or n_head
        key_length = int(info.arch_get("attention.key_length", 0) or n_embd // n_head)
        value_length = int(info.arch_get("attention.value_length", 0) or n_embd // n_head)
        total += context_size * n_head_kv * (key_length + value_length) * KV_BYTES_PER_ELEMENT
    return total


def compute_bytes(info: GGUFInfo, batch_size: int) -> int:
    n_embd = int(info.arch_get("embedding_length", 0) or 0)
    return batch_size * 4 * (info.vocab_size + 4 * n_embd) + COMPUTE_OVERHEAD


def estimate_memory(info: GGUFInfo, context_size: int, batch_size: int) -> MemoryEstimate:
    return MemoryEstimate(
        weights=info.tensor_bytes,
        kv_cache=kv_cache_bytes(info, context_size),
        compute=compute_bytes(info, batch_size),
    )
