"""A ``transformers`` KV cache cut into fixed blocks of tokens, and put back together.

A block holds the keys and values of ``block_tokens`` consecutive tokens for
every layer: one contiguous tensor ``[layers, 2, kv_heads, block_tokens,
head_dim]`` (index 0 keys, 1 values), in the model's dtype and on its device,
which is what ``LoraKVCache.insert_kv`` stores and ``match_prefix`` returns.
Only models whose cache is a ``DynamicCache`` of full-attention layers (Llama,
Mistral, Qwen2 without sliding windows, ...) are cut this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def to_blocks(cache: DynamicCache, start: int, stop: int, block_tokens: int) -> list[torch.Tensor]:
    """The blocks of tokens ``[start, stop)`` of ``cache`` (batch of one), each a tensor of its own;
    ``start`` and ``stop`` are multiples of ``block_tokens``."""
    if start % block_tokens or stop % block_tokens or not 0 <= start <= stop:
        raise ValueError(f"[{start}, {stop}) is not a range of whole blocks of {block_tokens} tokens")
    if start == stop:
        return []
    layers = [(layer.keys[0, :, start:stop], layer.values[0, :, start:stop]) for layer in cache.layers]
    stacked = torch.stack([torch.stack(kv) for kv in layers])  # [layers, 2, heads, tokens, head_dim]
    # Each block its own storage (contiguous() of a slice along tokens copies): an evicted block frees its memory.
    return [stacked[:, :, :, i:i + block_tokens].contiguous() for i in range(0, stop - start, block_tokens)]


def from_blocks(blocks: Sequence[torch.Tensor]) -> DynamicCache:
    """A cache holding the tokens of ``blocks`` in order (an empty cache for none)."""
    if not blocks:
        return DynamicCache()
    joined = torch.cat(list(blocks), dim=3)
    return DynamicCache([(joined[i, 0].unsqueeze(0), joined[i, 1].unsqueeze(0)) for i in range(joined.shape[0])])


def block_bytes(config, block_tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one block for a model ``config`` (a ``transformers`` config)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * block_tokens * head_dim * dtype.itemsize
