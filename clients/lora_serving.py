"""A multi-LoRA serving loop on a ``transformers`` causal LM, fed by ``LoraKVCache`` (or a cache like it).

For each request (adapter, prompt), ``LoraServer.serve``:

1. takes the adapter's tensors from the store (``acquire_adapter``) and
   applies them in place with ``lora_apply.LoraLayers`` (PEFT's arithmetic,
   no weight copied into the model);
2. asks the store for the longest cached prefix of the prompt under that
   adapter (``match_prefix``; never the whole prompt, so at least one token
   is prefilled and produces the logits), and turns its blocks into a
   ``DynamicCache`` (``kv_blocks.from_blocks``);
3. prefills only the rest of the prompt on top of the restored keys and
   values, and takes the first token (greedy) from the last position's logits;
4. cuts the new full blocks out of the cache (``kv_blocks.to_blocks``) and
   hands them back (``insert_kv``), then releases what it held.

``Replay`` runs requests that arrive on a clock through one server, first
come first served, one at a time, and measures time to first token from
arrival, queueing included. Two clocks:

- ``WallClock``: real time; the loop sleeps until each arrival.
- ``Timeline``: real time while a request is being served; the time a server
  would sit idle waiting for the next arrival is skipped instead of slept.
  ``pause``/``resume`` stop it while other work uses the machine, so several
  servers can take turns request by request and each still sees its own
  timeline (what a benchmark on a busy shared machine needs: every contender
  meets the same noise at the same moments). Queueing is what a FIFO server
  would see, since each request starts at ``max(arrival, previous finish)``.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from igtcache.clients.kv_blocks import from_blocks, to_blocks
from igtcache.clients.lora_apply import LoraLayers
from igtcache.clients.prefix_attention import use_prefix_attention

_LAYERS: weakref.WeakKeyDictionary[nn.Module, LoraLayers] = weakref.WeakKeyDictionary()


class PrefixStore(Protocol):
    """What the loop needs of a cache of adapters and prefix KV: ``LoraKVCache``'s request API."""

    block_tokens: int
    model_id: str

    def acquire_adapter(self, name: str) -> Any:
        """A mapping of the adapter's tensors (PEFT names) with a ``config`` attribute, held."""

    def match_prefix(self, adapter: str, token_ids: Sequence[int]) -> Any:
        """The longest cached prefix: ``.tokens`` and ``.blocks`` (held)."""

    def insert_kv(self, adapter: str, token_ids: Sequence[int], blocks: Sequence[torch.Tensor]) -> int:
        """Cache the KV blocks of ``token_ids``."""

    def release(self, handle: Any) -> None:
        """Stop holding an adapter or a match."""


@dataclass(frozen=True)
class Request:
    """A request of a conversation (or session): its ``turn``, arriving ``arrival`` seconds into the run."""

    arrival: float
    adapter: str
    conversation: int
    turn: int
    prompt: np.ndarray  # token ids, int64


@dataclass
class FirstToken:
    """What serving one request produced, with the clock's readings."""

    token: int
    logits: torch.Tensor  # the last prompt position's logits, float32, on the CPU
    prompt_tokens: int
    matched_tokens: int
    started: float
    adapter_at: float      # the adapter applied
    prefill_at: float      # the prefix's KV restored: prefill starts
    first_token_at: float
    finished: float        # the new KV blocks cached


@dataclass
class Served:
    """A request served by ``Replay``: ``ttft`` from arrival to first token, queueing included."""

    request: Request
    result: FirstToken

    @property
    def ttft(self) -> float:
        return self.result.first_token_at - self.request.arrival

    @property
    def queued(self) -> float:
        return self.result.started - self.request.arrival


def model_fingerprint(model: nn.Module) -> str:
    """An identity of a model's config and weights (a sample of each parameter: cheap, and distinct
    for models that differ only in their weights)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        digest.update(parameter.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class WallClock:
    """Seconds since ``start()``, in real time; ``wait_until`` sleeps."""

    def __init__(self) -> None:
        self._origin = time.perf_counter()

    def start(self) -> None:
        self._origin = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self._origin

    def wait_until(self, t: float) -> None:
        delay = t - self()
        if delay > 0:
            time.sleep(delay)


class Timeline:
    """Seconds since ``start()`` that pass in real time while running and skip ahead on ``wait_until``;
    ``pause``/``resume`` stop it in between (see the module's docstring)."""

    def __init__(self) -> None:
        self._offset = -time.perf_counter()
        self._paused_at: float | None = None

    def start(self) -> None:
        self._offset, self._paused_at = -time.perf_counter(), None

    def __call__(self) -> float:
        if self._paused_at is not None:
            return self._paused_at
        return time.perf_counter() + self._offset

    def wait_until(self, t: float) -> None:
        if self._paused_at is not None:
            raise RuntimeError("the timeline is paused")
        now = self()
        if t > now:
            self._offset += t - now

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._offset = self._paused_at - time.perf_counter()
            self._paused_at = None


class LoraServer:
    """One model serving many adapters from ``store``, timed by ``clock`` (a ``WallClock`` or ``Timeline``;
    give the store the same clock, so that its usage estimates follow the requests' time).

    The model is switched to ``prefix_attention`` (one sequence at a time, exact, without the cost of a
    masked kernel on restored prefixes). Servers of one model share its LoRA hooks.
    """

    def __init__(self, model: nn.Module, store: PrefixStore, clock: WallClock | Timeline | None = None) -> None:
        self.model = model.eval()
        self.store = store
        self.clock = clock if clock is not None else WallClock()
        if model not in _LAYERS:
            use_prefix_attention(model)
            _LAYERS[model] = LoraLayers(model)
        self.layers = _LAYERS[model]
        self.device = next(model.parameters()).device
        fingerprint = model_fingerprint(model)
        if store.model_id != fingerprint:
            raise ValueError(f"the store holds KV of model {store.model_id!r}, not of this model ({fingerprint}); "
                             "give it model_id=model_fingerprint(model)")

    def serve(self, adapter: str, prompt: Sequence[int]) -> FirstToken:
        """Prefill ``prompt`` under ``adapter`` reusing cached KV, cache the new blocks, return the first token."""
        prompt = np.asarray(prompt, dtype=np.int64)
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError("a prompt is a non-empty flat sequence of token ids")
        started = self.clock()
        block_tokens = self.store.block_tokens
        handle = self.store.acquire_adapter(adapter)
        try:
            self.layers.activate(adapter, handle, handle.config)
            adapter_at = self.clock()
            match = self.store.match_prefix(adapter, prompt[:-1])
            try:
                cache = from_blocks(match.blocks)
                prefill_at = self.clock()
                rest = torch.as_tensor(prompt[match.tokens:], device=self.device).unsqueeze(0)
                with torch.no_grad():
                    out = self.model(input_ids=rest, cache=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1]
                token = int(logits.argmax())  # waits for the device
                first_token_at = self.clock()
                full = len(prompt) // block_tokens * block_tokens
                new = to_blocks(cache, match.tokens, full, block_tokens)
                self.store.insert_kv(adapter, prompt, [*match.blocks, *new])
            finally:
                self.store.release(match)
        finally:
            self.layers.deactivate()
            self.store.release(handle)
        return FirstToken(token, logits.float().cpu(), len(prompt), match.tokens, started, adapter_at, prefill_at,
                          first_token_at, self.clock())


class Replay:
    """Requests through ``server`` on its clock, one at a time, first come first served."""

    def __init__(self, server: LoraServer) -> None:
        self.server = server
        self.clock = server.clock
        self.served: list[Served] = []

    def step(self, request: Request) -> Served:
        """Wait for ``request``'s arrival (unless the server is still busy), then serve it."""
        self.clock.wait_until(request.arrival)
        served = Served(request, self.server.serve(request.adapter, request.prompt))
        self.served.append(served)
        return served

    def run(self, requests: Sequence[Request]) -> list[Served]:
        self.clock.start()
        for request in requests:
            self.step(request)
        return self.served


def ttft_summary(served: Sequence[Served]) -> Mapping[str, float]:
    """p50 and p99 TTFT, mean queueing, and the share of prompt tokens whose KV was cached."""
    ttfts = np.array([s.ttft for s in served])
    prompt = sum(s.result.prompt_tokens for s in served)
    return {"ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p99_s": float(np.percentile(ttfts, 99)),
            "ttft_mean_s": float(ttfts.mean()), "queued_mean_s": float(np.mean([s.queued for s in served])),
            "kv_hit_ratio": sum(s.result.matched_tokens for s in served) / max(prompt, 1)}
