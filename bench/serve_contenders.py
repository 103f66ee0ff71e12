"""The other caches of the serving benchmark, with ``LoraKVCache``'s request API and real tensors.

- ``NoCache``: the adapter is read from its source on every request, every
  prompt is prefilled in full.
- ``FlatPools``: adapters and prefix KV blocks with no dependency between them,
  in an HBM pool (unified, or split with a fixed share for adapters) and a host
  pool, evicted least recently used first or by the cost model's values:

  * vLLM-style: adapters in a fixed share of HBM, KV in the rest, both LRU;
    adapters evicted from HBM go to an LRU host cache, KV evicted is dropped
    (prefix caching in HBM only). A sequence's blocks are touched tail first,
    so its tail leaves before its head, as vLLM's evictor orders them.
  * S-LoRA-style: one unified HBM pool for adapters and KV, LRU, the same host
    cache of adapters, KV evicted is dropped.
  * the "cost model without the tree" ablation: one unified pool, KV evicted to
    the host pool too, victims chosen by ``swapper.CostModel``'s values, but
    no dependency: KV may stay in HBM while its adapter has left, and a block
    may leave before the blocks after it (which cannot be matched until it
    returns).

  There is no background swapper: copies happen on demand.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from igtcache.clients.kv_tree import AdapterNode, KVNode, Node, chain_hashes
from igtcache.clients.lora_kv import (
    Adapter, AdapterBytes, CacheFullError, PrefixMatch, adapter_tensors, read_adapter,
)
from igtcache.clients.swapper import RANKINGS


class CountingSource:
    """An adapter source that counts the files and bytes read through it."""

    def __init__(self, source) -> None:
        self.source = source
        self.description = source.description
        self.files = 0
        self.bytes = 0

    def read(self, path: str) -> bytes:
        data = self.source.read(path)
        self.files += 1
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self.source.close()


def pack(loaded: AdapterBytes) -> torch.Tensor:
    """An adapter's tensors packed into one CPU byte tensor at its slots."""
    flat = torch.zeros(loaded.nbytes, dtype=torch.uint8)
    view = flat.numpy()
    for slot, piece in zip(loaded.slots, loaded.pieces):
        view[slot.offset:slot.offset + slot.nbytes] = np.frombuffer(piece, dtype=np.uint8)
    return flat


def _release(handle: Adapter | PrefixMatch) -> None:
    if handle.released:
        raise ValueError(f"{handle!r} released twice")
    handle.released = True
    for node in [handle._node] if isinstance(handle, Adapter) else handle.nodes:
        node.refs -= 1


class NoCache:
    """Every request reads its adapter from the source; nothing is cached, nothing matched."""

    def __init__(self, source, *, device: str | torch.device, block_tokens: int, model_id: str) -> None:
        self.source, self.device = source, torch.device(device)
        self.block_tokens, self.model_id = block_tokens, model_id

    def acquire_adapter(self, name: str) -> Adapter:
        loaded = read_adapter(self.source, name)
        node = AdapterNode(name=name, nbytes=loaded.nbytes, refs=1)
        return Adapter(name, loaded.config, adapter_tensors(pack(loaded).to(self.device), loaded.slots), node)

    def match_prefix(self, adapter: str, token_ids: Sequence[int]) -> PrefixMatch:
        return PrefixMatch(adapter, 0, [], [])

    def insert_kv(self, adapter: str, token_ids: Sequence[int], blocks: Sequence[torch.Tensor]) -> int:
        return 0

    def release(self, handle: Adapter | PrefixMatch) -> None:
        _release(handle)


class FlatPools:
    """Adapters and KV blocks in HBM and host pools, no dependency tree (see the module's docstring).

    ``adapter_share``: the share of HBM reserved for adapters (KV gets the
    rest), or ``None`` for one pool of both. ``kv_on_host``: KV evicted from
    HBM moves to the host pool instead of being dropped. ``ranking``: ``"lru"``
    or ``"cost"`` (``swapper.CostModel`` with ``window``, ``prefill_token_s``
    and ``bandwidth``).
    """

    def __init__(self, source, *, device: str | torch.device, hbm_bytes: int, host_bytes: int, block_tokens: int,
                 model_id: str, clock: Callable[[], float], adapter_share: float | None = None,
                 kv_on_host: bool = False, ranking: str = "lru", window: float = 30.0,
                 prefill_token_s: float = 1e-4, bandwidth: dict[str, float] | None = None) -> None:
        self.source, self.device = source, torch.device(device)
        self.block_tokens, self.model_id, self.clock = block_tokens, model_id, clock
        self._seed = hashlib.blake2b(model_id.encode(), digest_size=16).digest() if model_id else b""
        self.kv_on_host, self.ranking = kv_on_host, ranking
        rates = {"h2d": 20e9, "d2h": 20e9, "source": 1e9, **(bandwidth or {})}
        self.model = RANKINGS[ranking](window=window, block_tokens=block_tokens, prefill_token_s=prefill_token_s,
                                       bandwidth=rates.__getitem__)
        if adapter_share is None:
            self.capacity = {"hbm": hbm_bytes}
            self._pool = {AdapterNode: "hbm", KVNode: "hbm"}
        else:
            self.capacity = {"adapters": int(hbm_bytes * adapter_share), "kv": hbm_bytes - int(hbm_bytes * adapter_share)}
            self._pool = {AdapterNode: "adapters", KVNode: "kv"}
        self.capacity["host"] = host_bytes
        self.used = dict.fromkeys(self.capacity, 0)
        self.resident: dict[str, OrderedDict[Node, None]] = {pool: OrderedDict() for pool in self.capacity}
        self.adapters: dict[str, AdapterNode] = {}
        self.kv: dict[tuple[str, bytes], KVNode] = {}
        self._pin = self.device.type == "cuda"

    # ------------------------------------------------------------------ the request API

    def acquire_adapter(self, name: str) -> Adapter:
        now = self.clock()
        self.model.request(now)
        node = self.adapters.get(name)
        if node is None or (node.dev is None and node.host is None):
            loaded = read_adapter(self.source, name)
            node = node or AdapterNode(name=name)
            node.config, node.slots, node.nbytes = loaded.config, loaded.slots, loaded.nbytes
            self.adapters[name] = node
            packed = pack(loaded)
            if self._room("host", node.nbytes, {node}):
                self._set(node, "host", self._to_host(packed))
        else:
            packed = node.host
        if node.dev is None:
            pool = self._pool[AdapterNode]
            if node.nbytes > self.capacity[pool]:
                raise ValueError(f"adapter {name!r} ({node.nbytes} bytes) is larger than HBM's {pool} pool "
                                 f"({self.capacity[pool]} bytes)")
            if not self._room(pool, node.nbytes, {node}):
                raise CacheFullError(f"no room in HBM for adapter {name!r}: everything there is held")
            self._set(node, self._pool[AdapterNode], packed.to(self.device, copy=True))
        node.refs += 1
        self._use(node, now)
        return Adapter(name, node.config, adapter_tensors(node.dev, node.slots), node)

    def match_prefix(self, adapter: str, token_ids: Sequence[int]) -> PrefixMatch:
        now = self.clock()
        path: list[KVNode] = []
        for key in chain_hashes(token_ids, self.block_tokens, self._seed):
            node = self.kv.get((adapter, key))
            if node is None:
                break
            if node.dev is None:
                if not self._room(self._pool[KVNode], node.nbytes, {node}):
                    break
                self._set(node, self._pool[KVNode], node.host.to(self.device, copy=True))
            node.refs += 1
            path.append(node)
        for node in reversed(path):  # the head most recent: a sequence's tail is evicted first
            self._use(node, now)
        blocks = [node.dev.view(node.dtype).view(node.shape) for node in path]
        return PrefixMatch(adapter, len(path) * self.block_tokens, blocks, path)

    def insert_kv(self, adapter: str, token_ids: Sequence[int], blocks: Sequence[torch.Tensor]) -> int:
        now = self.clock()
        owner = self.adapters[adapter]
        new: list[KVNode] = []
        for key, block in zip(chain_hashes(token_ids, self.block_tokens, self._seed), blocks):
            if (adapter, key) in self.kv:
                continue
            flat = block.reshape(-1).view(torch.uint8)
            node = KVNode(key=key, adapter=owner, dtype=block.dtype, shape=tuple(block.shape), nbytes=flat.numel())
            if self._room(self._pool[KVNode], node.nbytes, set(new)):
                self._set(node, self._pool[KVNode], flat)
            elif self.kv_on_host and self._room("host", node.nbytes, set(new)):
                self._set(node, "host", self._to_host(flat))
            else:
                break
            self.kv[adapter, key] = node
            new.append(node)
        for node in reversed(new):
            self._use(node, now)
        return len(new)

    def release(self, handle: Adapter | PrefixMatch) -> None:
        _release(handle)

    # ------------------------------------------------------------------ placement

    def _use(self, node: Node, now: float) -> None:
        self.model.use(node, now)
        for pool in self.resident.values():
            if node in pool:
                pool.move_to_end(node)

    def _set(self, node: Node, pool: str, tensor: torch.Tensor) -> None:
        if pool == "host":
            node.host = tensor
        else:
            node.dev = tensor
        self.used[pool] += node.nbytes
        self.resident[pool][node] = None

    def _clear(self, node: Node, pool: str) -> torch.Tensor:
        tensor = node.host if pool == "host" else node.dev
        if pool == "host":
            node.host = None
        else:
            node.dev = None
        self.used[pool] -= node.nbytes
        del self.resident[pool][node]
        return tensor

    def _room(self, pool: str, nbytes: int, keep: set[Node]) -> bool:
        """Evict from ``pool`` until ``nbytes`` fit; whether they do. Scoring by cost ranks every copy, so it
        frees a margin (as ``LoraKVCache`` does) that lets the next blocks in without a round of their own."""
        if nbytes > self.capacity[pool]:
            return False
        free = self.capacity[pool] - self.used[pool]
        if free >= nbytes:
            return True
        wanted = nbytes if self.ranking == "lru" else min(self.capacity[pool], nbytes + self.capacity[pool] // 20)
        for victim in self._victims(pool, keep):
            self._evict(victim, pool, keep)
            if self.capacity[pool] - self.used[pool] >= wanted:
                return True
        return self.capacity[pool] - self.used[pool] >= nbytes

    def _victims(self, pool: str, keep: set[Node]) -> Iterator[Node]:
        """Unheld copies in ``pool`` outside ``keep``, least recently used or least valuable first."""
        candidates = (n for n in self.resident[pool] if not n.refs and n not in keep)
        if self.ranking == "lru":
            yield from list(candidates)
            return
        now, tie = self.clock(), itertools.count()
        if pool == "host":
            heap = [(self.model.host_value(n, now), next(tie), n) for n in candidates]
        else:
            heap = [(self.model.device_value(n, now, on_path=True), next(tie), n) for n in candidates]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[-1]

    def _evict(self, node: Node, pool: str, keep: set[Node]) -> None:
        """Give up ``node``'s copy in ``pool``: a last device copy moves to the host pool if it may and fits
        (evicting nothing in ``keep``); a KV block left with no copy is forgotten (an adapter can be read from
        its source again)."""
        tensor = self._clear(node, pool)
        if node.dev is not None or node.host is not None:
            return
        if (pool != "host" and (isinstance(node, AdapterNode) or self.kv_on_host)
                and self._room("host", node.nbytes, {*keep, node})):
            self._set(node, "host", self._to_host(tensor))
        elif isinstance(node, KVNode):
            del self.kv[node.adapter.name, node.key]

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin).copy_(tensor)
