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

from nbllm.core.gguf_file import GGUFInfo
from nbllm.core.units import format_bytes

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


# ---------------------------------------------------------------------------- GPU offload fit

# What a CUDA context and llama.cpp's own bookkeeping take before any tensor, and a safety
# share of free memory left for fragmentation and other processes.
GPU_RESERVE_BYTES = 384 * 2**20
GPU_MARGIN = 0.05


def layer_weight_bytes(info: GGUFInfo) -> list[int]:
    """Weight bytes of each repeating layer (``blk.N.*`` tensors)."""
    sizes = [0] * info.n_layers
    for tensor in info.tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".", 2)[1])
            if index < len(sizes):
                sizes[index] += tensor.nbytes
    return sizes


def output_weight_bytes(info: GGUFInfo) -> int:
    """The output layer: ``output.weight`` (or the tied token embedding, duplicated on the GPU) + norm."""
    output = info.tensor("output.weight") or info.tensor("token_embd.weight")
    norm = info.tensor("output_norm.weight")
    return (output.nbytes if output else 0) + (norm.nbytes if norm else 0)


@dataclass(frozen=True)
class GpuFit:
    """How many layers to offload, by estimate and by the guide's rule of thumb."""

    layers: int  # llama.cpp's n_gpu_layers: n_layers + 1 means everything incl. the output layer
    n_layers: int
    gpu_bytes: int  # estimated GPU memory for ``layers``
    free_bytes: int
    rule_of_thumb_layers: int
    rule_of_thumb: str

    @property
    def everything(self) -> bool:
        return self.layers > self.n_layers


def gpu_bytes_for(info: GGUFInfo, layers: int, context_size: int, batch_size: int) -> int:
    """Estimated GPU memory with ``layers`` offloaded (llama.cpp offloads the *last* layers)."""
    if layers <= 0:
        return 0
    n = info.n_layers
    on_gpu = min(layers, n)
    weights = sum(layer_weight_bytes(info)[n - on_gpu :])
    if layers > n:
        weights += output_weight_bytes(info)
    kv = kv_cache_bytes(info, context_size) * on_gpu // max(n, 1)
    return weights + kv + gpu_compute_bytes(info, layers > n, context_size, batch_size) + GPU_RESERVE_BYTES


def gpu_compute_bytes(info: GGUFInfo, with_output: bool, context_size: int, batch_size: int) -> int:
    """The GPU's compute buffer: activations and attention scores of one micro-batch, plus the
    logits when the output layer runs there (the big part for large vocabularies)."""
    n_embd = int(info.arch_get("embedding_length", 0) or 0)
    n_ff = info.arch_get("feed_forward_length", 0)
    n_ff = max(n_ff) if isinstance(n_ff, list) else int(n_ff or 0)
    heads = info.arch_get("attention.head_count", 1)
    n_head = max(heads) if isinstance(heads, list) else int(heads or 1)
    activations = batch_size * 4 * (4 * n_embd + n_ff)
    scores = batch_size * context_size * n_head * 4
    logits = batch_size * 4 * info.vocab_size if with_output else 0
    return activations + scores + logits + COMPUTE_OVERHEAD


def rule_of_thumb(info: GGUFInfo, vram_total: int) -> tuple[int, str]:
    """The guide's rule: model under half the VRAM -> all layers; under all of it -> half; else none."""
    size = info.file_size
    if vram_total <= 0:
        return 0, "no GPU: CPU only"
    if size < vram_total * 0.5:
        return info.n_layers + 1, "model < half the VRAM: all layers"
    if size < vram_total:
        return (info.n_layers + 1) // 2, "model < VRAM: half the layers"
    return 0, "model > VRAM: CPU only"


def fit_gpu_layers(info: GGUFInfo, free_vram: int, total_vram: int, context_size: int, batch_size: int) -> GpuFit:
    """The largest n_gpu_layers whose estimate fits in free VRAM with a margin."""
    budget = free_vram * (1 - GPU_MARGIN)
    best = 0
    for layers in range(info.n_layers + 1, 0, -1):
        if gpu_bytes_for(info, layers, context_size, batch_size) <= budget:
            best = layers
            break
    thumb_layers, thumb_text = rule_of_thumb(info, total_vram)
    return GpuFit(
        layers=best,
        n_layers=info.n_layers,
        gpu_bytes=gpu_bytes_for(info, best, context_size, batch_size),
        free_bytes=free_vram,
        rule_of_thumb_layers=thumb_layers,
        rule_of_thumb=thumb_text,
    )
