"""Attention for a prefill on top of restored KV, without paying for the masked half.

A prefill of ``n`` new tokens after ``p`` cached ones attends each new token
to every earlier one: a causal mask shifted by ``p``. ``transformers``'s SDPA
path builds that mask and hands it to ``scaled_dot_product_attention``,
whose masked kernels compute the whole ``n x (p + n)`` rectangle; its causal
kernel (``is_causal``) skips the upper triangle but aligns the diagonal to
the top-left, which is only right when ``p == 0``. On a CPU, a 1,764-token
prefill after 32 cached tokens then took longer than prefilling all 1,796
(1.6x here): a short prefix hit would be worse than no hit.

``prefix_causal_attention`` picks the cheaper exact form per call:

- ``p == 0``: the causal kernel, as SDPA does;
- otherwise the causal kernel over ``p`` zero queries followed by the ``n``
  real ones (row ``p + i`` attends keys ``0 .. p + i``, exactly the shifted
  mask), keeping the last ``n`` rows: ``(p + n)^2 / 2`` scores;
- or, when the prefix is long against the new tokens, the explicit mask:
  ``n (p + n)`` scores at a somewhat higher cost each (``MASKED_COST``).

It assumes what the serving loop does: one sequence, no padding, causal
self-attention. It is registered with ``transformers`` as
``"igtcache_prefix"``, under which name models build no mask of their own;
``use_prefix_attention(model)`` switches a model to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "igtcache_prefix"
# Measured on CPU (torch 2.13): the masked kernel's time per score over the causal kernel's.
MASKED_COST = 1.3


def prefix_causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **_kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention of ``query`` ([1, heads, n, dim]) over ``key``/``value`` ([1, kv_heads, p + n, dim]),
    the last ``n`` keys being the queries' own; returns ([1, n, heads, dim], None)."""
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"{NAME} attention serves one unpadded sequence; use sdpa for batches")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    new, total = query.shape[2], key.shape[2]
    cached = total - new
    if cached == 0:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    elif total * total / 2 <= MASKED_COST * new * total:
        padded = torch.cat([query.new_zeros(*query.shape[:2], cached, query.shape[3]), query], dim=2)
        out = F.scaled_dot_product_attention(padded, key, value, is_causal=True, scale=scaling)[:, :, cached:]
    else:
        mask = torch.ones(new, total, dtype=torch.bool, device=query.device).tril(cached)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_prefix_attention(model: nn.Module) -> None:
    """Make ``model`` (a ``transformers`` model) attend with ``prefix_causal_attention``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, prefix_causal_attention)
    model.set_attn_implementation(NAME)
