"""``LoraKVCache``: LoRA adapters and the KV blocks of reused prompt prefixes, cached together.

In the spirit of FASTLIBRA (arXiv 2505.03756): one pool in HBM and one in
host memory, each shared by adapters and KV blocks with no fixed split; a
dependency tree (``kv_tree``) that keeps a KV block in HBM only while its
adapter is there; a cost model (``swapper``) that evicts the least valuable
leaves and prefetches the most probable host-resident subtrees; the host pool
and its copies from ``igtcache.cuda``; adapters read from their source
(``adapter_source``), which may be the igtcache node cache.

Typical request on an inference server::

    adapter = cache.acquire_adapter("customer-7")          # tensors on the device, held
    match = cache.match_prefix("customer-7", prompt_ids)   # cached KV of the longest prefix, held
    ... prefill prompt_ids[match.tokens:], producing KV blocks ...
    cache.insert_kv("customer-7", prompt_ids, kv_blocks)   # block i holds tokens [i*B, (i+1)*B)
    cache.release(match); cache.release(adapter)
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, NamedTuple, Sequence

import torch

from igtcache.clients import safetensors_file
from igtcache.clients.adapter_source import CONFIG_FILE, WEIGHTS_FILE, AdapterSource, check_name, open_source
from igtcache.clients.kv_tree import AdapterNode, DependencyTree, KVNode, Node, TensorSlot, chain_hashes
from igtcache.clients.swapper import RANKINGS, device_victims, host_victims, prefetch_candidates
from igtcache.cuda import HostBuffer, PinnedBlockPool, PoolFull

GiB = 1 << 30
# Adapter tensors are packed at this alignment, enough for any dtype view and for coalesced access.
_ALIGN = 256
# Until a transfer has been measured, the cost model assumes these bytes/s.
DEFAULT_BANDWIDTH = {"h2d": 20e9, "d2h": 20e9, "source": 1e9}
_RATE_DECAY = 0.9


class CacheFullError(MemoryError):
    """The pool cannot make room: what would have to leave is held by requests in use."""


class AdapterError(ValueError):
    """An adapter whose files are missing or malformed (nothing of it is cached)."""


class Adapter(Mapping):
    """An adapter's tensors on the device, held until ``LoraKVCache.release``."""

    def __init__(self, name: str, config: dict, tensors: dict[str, torch.Tensor], node: AdapterNode) -> None:
        self.name = name
        self.config = config
        self._tensors = tensors
        self._node = node
        self.released = False

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, {len(self)} tensors{', released' if self.released else ''})"


@dataclass(eq=False)
class PrefixMatch:
    """The longest cached prefix: ``tokens`` leading tokens, whose KV ``blocks`` are on the device, held."""

    adapter: str
    tokens: int
    blocks: list[torch.Tensor]
    nodes: list[KVNode] = field(repr=False)
    released: bool = False


@dataclass
class AdapterBytes:
    """An adapter read from its source and checked, not yet cached: its tensors packed at ``slots``."""

    config: dict
    slots: list[TensorSlot]
    pieces: list[memoryview]
    nbytes: int        # packed size
    file_bytes: int    # bytes read from the source


class AdapterFiles(NamedTuple):
    """An adapter's two files as read, with the config parsed and the weights' header checked."""

    raw_config: bytes
    config: dict
    weights: bytes
    specs: list
    body: memoryview


def read_adapter_files(source: AdapterSource, name: str) -> AdapterFiles:
    """Read adapter ``name``'s files (PEFT layout) from ``source`` and check them: ``KeyError(name)``
    if absent, ``AdapterError`` naming the file and the fault if damaged."""
    try:
        raw_config = source.read(f"{name}/{CONFIG_FILE}")
    except FileNotFoundError:
        raise KeyError(name) from None
    try:
        weights = source.read(f"{name}/{WEIGHTS_FILE}")
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r} in {source.description} has no {WEIGHTS_FILE}") from None
    try:
        config = json.loads(raw_config)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    try:
        specs, body = safetensors_file.parse(weights, f"adapter {name!r} {WEIGHTS_FILE}")
    except safetensors_file.SafetensorsError as exc:
        raise AdapterError(str(exc)) from None
    return AdapterFiles(raw_config, config, weights, specs, body)


def read_adapter(source: AdapterSource, name: str) -> AdapterBytes:
    """Read adapter ``name`` (PEFT layout) from ``source``, checked as :func:`read_adapter_files` does,
    with its tensors laid out for packing."""
    files = read_adapter_files(source, name)
    slots, offset = [], 0
    for spec in files.specs:
        slots.append(TensorSlot(name=spec.name, dtype=spec.dtype, shape=spec.shape, offset=offset, nbytes=spec.nbytes))
        offset += -(-spec.nbytes // _ALIGN) * _ALIGN
    return AdapterBytes(files.config, slots, [files.body[s.start:s.end] for s in files.specs], offset,
                        len(files.raw_config) + len(files.weights))


def adapter_tensors(flat: torch.Tensor, slots: Sequence[TensorSlot]) -> dict[str, torch.Tensor]:
    """The tensors of an adapter packed in the byte tensor ``flat``, as views."""
    return {s.name: _view(flat[s.offset:s.offset + s.nbytes], s.dtype, s.shape) for s in slots}


class LoraKVCache:
    """Adapters and their prefix KV blocks in one HBM pool and one host pool, placed by a cost model.

    ``source``: where adapters live in PEFT layout (a local directory, an fsspec
    URL read through an embedded ``igtcache.Cache`` with ``cache_options``,
    ``"igtcache::<url>"`` for the node daemon, or a ``Cache``-like object).
    ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA if available). The HBM
    pool holds ``hbm_bytes`` of adapters and KV together; the host pool is one
    pinned buffer of ``host_bytes``. ``block_tokens`` tokens make a KV block.

    Cost model: ``window`` (seconds, the time constant of usage estimates),
    ``prefill_token_s`` (the time to recompute one token's KV), ``bandwidth``
    (fixed bytes/s for ``h2d``, ``d2h``, ``source``; measured where absent);
    ``ranking="lru"`` replaces its values with recency (an ablation).
    Every ``swap_interval`` seconds a pass swaps out the least valuable leaves
    when less than ``headroom`` of HBM is free, or prefetches the most probable
    host-resident subtrees (used with at least ``prefetch_min_probability``)
    into the free part beyond ``headroom``, or in place of device leaves worth
    less per byte. ``clock`` gives the time.

    ``model_id`` names the base model whose KV this cache holds (any string
    that differs between models, e.g. ``lora_serving.model_fingerprint``): it
    seeds every block's key, so KV never matches across base models, and a
    serving loop can refuse a cache made for another model.
    """

    def __init__(
        self,
        source: Any,
        device: str | torch.device | None = None,
        hbm_bytes: int = 4 * GiB,
        host_bytes: int = 16 * GiB,
        block_tokens: int = 16,
        *,
        prefill_token_s: float = 1e-4,
        window: float = 30.0,
        swap_interval: float = 0.05,
        headroom: float = 0.1,
        prefetch_min_probability: float = 0.01,
        bandwidth: dict[str, float] | None = None,
        host_block_bytes: int = 64 << 10,
        clock: Callable[[], float] = time.monotonic,
        cache_options: dict | None = None,
        model_id: str = "",
        ranking: str = "cost",
    ) -> None:
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {sorted(RANKINGS)}, got {ranking!r}")
        if hbm_bytes <= 0 or host_bytes < 0 or block_tokens <= 0:
            raise ValueError("hbm_bytes and block_tokens must be > 0 and host_bytes >= 0")
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.source = open_source(source, cache_options)
        self._owns_source = self.source is not source
        try:
            self.pool = PinnedBlockPool(host_bytes, device=device, block_bytes=host_block_bytes)
        except BaseException:
            if self._owns_source:
                self.source.close()
            raise
        self.device = self.pool.device
        self.hbm_bytes = hbm_bytes
        self.block_tokens = block_tokens
        self.swap_interval = swap_interval
        self.headroom = headroom
        self.prefetch_min_probability = prefetch_min_probability
        self._fixed_bandwidth = dict(bandwidth or {})
        self.clock = clock
        self._source_rate = [0.0, 0.0]
        self.tree = DependencyTree()
        self.model_id = model_id
        self._seed = hashlib.blake2b(model_id.encode(), digest_size=16).digest() if model_id else b""
        self.model = RANKINGS[ranking](window=window, block_tokens=block_tokens, prefill_token_s=prefill_token_s,
                               bandwidth=self._bandwidth)
        self.counters: dict[str, int] = dict.fromkeys([
            "requests", "adapter_hits_device", "adapter_hits_host", "adapter_loads_source",
            "source_bytes", "h2d_demand_bytes", "h2d_prefetch_bytes", "d2h_demand_bytes", "d2h_background_bytes",
            "kv_query_tokens", "kv_hit_tokens", "kv_hit_tokens_from_host", "kv_blocks_inserted",
            "kv_blocks_not_cached", "kv_blocks_dropped", "adapters_to_source", "device_evictions", "prefetches",
        ], 0)
        self._last_pass = clock()
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ public API

    def acquire_adapter(self, name: str) -> Adapter:
        """The adapter's tensors on the device, loaded through the host pool if needed, held until released.

        ``KeyError(name)`` if the source has no such adapter; ``AdapterError``
        if its files are damaged; ``ValueError`` if it is larger than a pool;
        ``CacheFullError`` if everything that could make room is in use.
        """
        check_name(name)
        self._check_open()
        with self._lock:
            node = self.tree.adapters.get(name)
            missing = node is None or (node.dev is None and node.host is None)
        loaded = self._read_adapter(name) if missing else None  # source I/O outside the lock
        with self._lock:
            now = self.clock()
            self.model.request(now)
            self.counters["requests"] += 1
            loads = self.counters["adapter_loads_source"]
            node = self._adapter_with_bytes(name, loaded)
            on_device = node.dev is not None
            self._bring_to_device(node, demand=True, keep={node})
            node.refs += 1
            if self.counters["adapter_loads_source"] == loads:
                self.counters["adapter_hits_device" if on_device else "adapter_hits_host"] += 1
            self.model.use(node, now)
            self._maybe_rebalance(now)
            self.pool.hand_over(node.dev, node.ready)
            return Adapter(name, node.config, adapter_tensors(node.dev, node.slots), node)

    def match_prefix(self, adapter: str, token_ids: Sequence[int]) -> PrefixMatch:
        """How many leading tokens have cached KV for ``adapter``, with their blocks on the device.

        Blocks in the host pool are swapped in (with the adapter, which they
        need on the device); if HBM cannot take them all, the match stops
        where room ran out. The matched blocks are held until released.
        """
        check_name(adapter)
        self._check_open()
        keys = chain_hashes(token_ids, self.block_tokens, self._seed)
        with self._lock:
            now = self.clock()
            self.counters["kv_query_tokens"] += len(token_ids)
            node = self.tree.adapters.get(adapter)
            path = self.tree.walk(node, keys) if node is not None else []
            held: list[KVNode] = []
            if path:
                keep = {node, *path}
                try:
                    if node.dev is None:
                        self._adapter_with_bytes(adapter, None)
                    try:  # room for everything at once: the leaves are scored once per request
                        self._make_device_room(sum(n.nbytes for n in (node, *path) if n.dev is None), keep, on_path=True)
                    except CacheFullError:
                        pass  # then as much of the prefix as fits
                    self._bring_to_device(node, demand=True, keep=keep)
                    node.refs += 1  # until its first block is on the device
                    try:
                        for kv in path:
                            from_host = kv.dev is None
                            self._bring_to_device(kv, demand=True, keep=keep)
                            kv.refs += 1
                            held.append(kv)
                            self.model.use(kv, now)
                            self.counters["kv_hit_tokens_from_host"] += self.block_tokens * from_host
                    finally:
                        node.refs -= 1
                except CacheFullError:
                    pass  # serve the part that fits
            self.counters["kv_hit_tokens"] += len(held) * self.block_tokens
            self._maybe_rebalance(now)
            blocks = []
            for kv in held:
                self.pool.hand_over(kv.dev, kv.ready)
                blocks.append(_view(kv.dev, kv.dtype, kv.shape))
            return PrefixMatch(adapter, len(held) * self.block_tokens, blocks, held)

    def insert_kv(self, adapter: str, token_ids: Sequence[int], blocks: Sequence[torch.Tensor]) -> int:
        """Cache the KV blocks of ``token_ids`` for ``adapter``; returns how many blocks were new.

        ``blocks[i]`` holds the KV of tokens ``[i*B, (i+1)*B)`` (``B`` =
        ``block_tokens``), on this cache's device; only full blocks are cached
        (a trailing partial block may be passed and is ignored). Blocks already
        cached are kept as they are. The cache keeps a reference to each new
        block (no copy): do not write to them afterwards. A block goes to HBM
        when its adapter is there and room can be made, else to the host pool,
        else it is not cached.
        """
        check_name(adapter)
        self._check_open()
        keys = chain_hashes(token_ids, self.block_tokens, self._seed)
        if not len(keys) <= len(blocks) <= -(-len(token_ids) // self.block_tokens):
            raise ValueError(f"{len(token_ids)} tokens make {len(keys)} full blocks of {self.block_tokens}; "
                             f"got {len(blocks)} KV blocks")
        for block in blocks[:len(keys)]:
            if not isinstance(block, torch.Tensor) or block.device != self.device or not block.is_contiguous():
                raise ValueError(f"KV blocks must be contiguous tensors on {self.device}")
            if block.nbytes > max(self.hbm_bytes, self.pool.capacity):
                raise ValueError(f"a KV block of {block.nbytes} bytes is larger than both pools "
                                 f"(HBM {self.hbm_bytes}, host {self.pool.capacity} bytes)")
        with self._lock:
            now = self.clock()
            node = self.tree.adapters.get(adapter)
            if node is None:
                raise KeyError(adapter)
            path = self.tree.walk(node, keys)
            parent: Node = path[-1] if path else node
            keep: set[Node] = {node, *path}
            inserted = 0
            for key, block in zip(keys[len(path):], blocks[len(path):len(keys)]):
                flat = block.reshape(-1).view(torch.uint8)
                child = self._place_new_block(parent, key, flat, block, keep)
                if child is None:
                    self.counters["kv_blocks_not_cached"] += len(keys) - len(path) - inserted
                    break
                self.model.use(child, now)
                keep.add(child)
                parent = child
                inserted += 1
            self.counters["kv_blocks_inserted"] += inserted
            self._maybe_rebalance(now)
            return inserted

    def release(self, handle: Adapter | PrefixMatch) -> None:
        """Stop holding what ``acquire_adapter`` or ``match_prefix`` returned."""
        with self._lock:
            if handle.released:
                raise ValueError(f"{handle!r} released twice")
            handle.released = True
            nodes = [handle._node] if isinstance(handle, Adapter) else handle.nodes
            for node in nodes:
                node.refs -= 1

    def rebalance(self) -> None:
        """Run the swapper's pass now (it also runs every ``swap_interval`` during calls)."""
        with self._lock:
            self._rebalance(self.clock())

    def stats(self) -> dict[str, Any]:
        """Counters, tier occupancy and the bandwidth figures the cost model uses."""
        with self._lock:
            tree = self.tree
            kinds = {"adapters": AdapterNode, "kv": KVNode}
            out: dict[str, Any] = dict(self.counters)
            out["kv_hit_rate"] = self.counters["kv_hit_tokens"] / max(1, self.counters["kv_query_tokens"])
            out["hbm"] = {"capacity": self.hbm_bytes, "bytes": tree.device_bytes,
                          **{f"{k}_bytes": sum(n.nbytes for n in tree.on_device if isinstance(n, t)) for k, t in kinds.items()},
                          "kv_without_adapter_bytes": tree.kv_bytes_without_adapter()}
            out["host"] = {"capacity": self.pool.capacity, "bytes": tree.host_bytes, "pinned": self.pool.pinned,
                           **{f"{k}_bytes": sum(n.nbytes for n in tree.on_host if isinstance(n, t)) for k, t in kinds.items()}}
            out["adapters_known"] = len(tree.adapters)
            out["kv_blocks"] = {"device": sum(isinstance(n, KVNode) for n in tree.on_device),
                                "host_only": sum(isinstance(n, KVNode) and n.dev is None for n in tree.on_host)}
            out["bandwidth"] = {kind: self._bandwidth(kind) for kind in DEFAULT_BANDWIDTH}
            out["device"] = str(self.device)
            return out

    def close(self) -> None:
        """Wait for copies in flight, then release the host pool and the source if this cache opened it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.pool.close()
            if self._owns_source:
                self.source.close()

    def __enter__(self) -> "LoraKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ adapters

    def _read_adapter(self, name: str) -> AdapterBytes:
        """Read and check an adapter from the source; nothing is cached yet."""
        started = time.perf_counter()
        loaded = read_adapter(self.source, name)
        self._record_source(loaded.file_bytes, time.perf_counter() - started)
        for pool, capacity in (("HBM", self.hbm_bytes), ("host", self.pool.capacity)):
            if loaded.nbytes > capacity:
                raise ValueError(f"adapter {name!r} needs {loaded.nbytes} bytes, more than the whole {pool} pool "
                                 f"({capacity} bytes)")
        return loaded

    def _adapter_with_bytes(self, name: str, loaded: AdapterBytes | None) -> AdapterNode:
        """The adapter's node with a copy on the device or in the host pool, reading it if needed."""
        node = self.tree.adapters.get(name)
        if node is not None and (node.dev is not None or node.host is not None):
            return node
        if loaded is None:
            loaded = self._read_adapter(name)  # another thread dropped it meanwhile: read under the lock
        if node is None:
            node = AdapterNode(name=name)
        buffer = self._host_alloc(loaded.nbytes, keep={node})
        if buffer is None:
            raise CacheFullError(f"host pool: no room for adapter {name!r} ({loaded.nbytes} bytes)")
        try:
            for slot, piece in zip(loaded.slots, loaded.pieces):
                self.pool.write(buffer, piece, slot.offset)
        except BaseException:
            self.pool.free(buffer)
            raise
        node.config, node.slots, node.nbytes = loaded.config, loaded.slots, loaded.nbytes
        self.tree.adapters[name] = node
        self.tree.set_host(node, buffer)
        self.counters["adapter_loads_source"] += 1
        self.counters["source_bytes"] += loaded.nbytes
        return node

    # ------------------------------------------------------------------ moving copies

    def _bring_to_device(self, node: Node, *, demand: bool, keep: Collection[Node]) -> None:
        """Give ``node`` (host copy, parent on the device) a device copy, making room first."""
        if node.dev is not None:
            return
        self._make_device_room(node.nbytes, keep, on_path=demand)
        tensor, transfer = self.pool.to_device(node.host)
        self.tree.set_device(node, tensor, transfer)
        self.counters["h2d_demand_bytes" if demand else "h2d_prefetch_bytes"] += node.nbytes

    def _make_device_room(self, nbytes: int, keep: Collection[Node], *, on_path: bool) -> None:
        """Evict until ``nbytes`` fit. ``on_path``: a request waits, so evict no more than that, and
        count write-backs in the choice. Otherwise free half the headroom more: scoring the leaves
        costs more than evicting them, and the next allocations then need no round of their own."""
        if nbytes > self.hbm_bytes:
            raise ValueError(f"{nbytes} bytes asked of an HBM pool of {self.hbm_bytes} bytes")
        if self.hbm_bytes - self.tree.device_bytes >= nbytes:
            return
        wanted = nbytes if on_path else min(self.hbm_bytes, nbytes + int(self.hbm_bytes * self.headroom / 2))
        for victim in device_victims(self.tree, self.model, self.clock(), keep, on_path):
            self._evict_from_device(victim, keep, demand=on_path)
            if self.hbm_bytes - self.tree.device_bytes >= wanted:
                return
        free = self.hbm_bytes - self.tree.device_bytes
        if free >= nbytes:
            return
        raise CacheFullError(f"HBM pool: {nbytes} bytes asked, {free} free of {self.hbm_bytes}; "
                             "the rest is held by requests in use")

    def _evict_from_device(self, node: Node, keep: Collection[Node], *, demand: bool) -> None:
        """Move a device leaf to the host pool; with no room there a KV block is dropped, an adapter
        falls back to its source."""
        if node.host is None:
            buffer = self._host_alloc(node.nbytes, keep={*keep, node})
            if buffer is not None:
                self.pool.to_host(node.dev, buffer)
                self.tree.set_host(node, buffer)
                self.counters["d2h_demand_bytes" if demand else "d2h_background_bytes"] += node.nbytes
        self.tree.clear_device(node)
        self.counters["device_evictions"] += 1
        if node.host is None:
            self._drop(node)

    def _place_new_block(self, parent: Node, key: bytes, flat: torch.Tensor, block: torch.Tensor,
                         keep: set[Node]) -> KVNode | None:
        """A new KV block below ``parent``: on the device if possible, else in the host pool, else ``None``."""
        size = flat.numel()
        if parent.dev is not None and size <= self.hbm_bytes:
            try:
                self._make_device_room(size, keep, on_path=False)
            except CacheFullError:
                pass
            else:
                child = self.tree.add_kv(parent, key, nbytes=size, dtype=block.dtype, shape=tuple(block.shape))
                self.tree.set_device(child, flat)
                return child
        buffer = self._host_alloc(size, keep)
        if buffer is None:
            return None
        child = self.tree.add_kv(parent, key, nbytes=size, dtype=block.dtype, shape=tuple(block.shape))
        self.pool.to_host(flat, buffer)
        self.tree.set_host(child, buffer)
        self.counters["d2h_background_bytes"] += size
        return child

    def _host_alloc(self, nbytes: int, keep: Collection[Node]) -> HostBuffer | None:
        """A host buffer, giving up the least valuable host copies for it (and, as for HBM, half the
        headroom more, so scoring is not redone for every block); ``None`` if it cannot fit."""
        if nbytes > self.pool.capacity:
            return None
        try:
            return self.pool.alloc(nbytes)
        except PoolFull:
            pass
        wanted = min(self.pool.capacity, nbytes + int(self.pool.capacity * self.headroom / 2))
        for victim in host_victims(self.tree, self.model, self.clock(), keep):
            if victim.dev is not None:
                self.pool.free(self.tree.clear_host(victim))
            else:
                self._drop(victim)
            if self.pool.free_bytes >= wanted:
                break
        return self.pool.alloc(nbytes) if self.pool.free_bytes >= nbytes else None

    def _drop(self, node: Node) -> None:
        """Lose a node that has no device copy: a KV block leaves with its subtree, an adapter keeps
        only its name (its bytes stay in the source)."""
        if isinstance(node, AdapterNode):
            if node.host is not None:
                self.pool.free(self.tree.clear_host(node))
            self.counters["adapters_to_source"] += 1
            return
        removed, buffers = self.tree.remove_subtree(node)
        for buffer in buffers:
            self.pool.free(buffer)
        self.counters["kv_blocks_dropped"] += removed

    # ------------------------------------------------------------------ the swapper's pass

    def _maybe_rebalance(self, now: float) -> None:
        if now - self._last_pass >= self.swap_interval:
            self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        """Swap out low-value leaves when HBM is nearly full; prefetch probable subtrees into free room, or in
        place of clean device leaves worth less per byte."""
        self._last_pass = now
        target = self.hbm_bytes * (1 - self.headroom)
        if self.tree.device_bytes > self.hbm_bytes * (1 - self.headroom / 2):
            for victim in device_victims(self.tree, self.model, now):
                self._evict_from_device(victim, (), demand=False)
                if self.tree.device_bytes <= target:
                    break
            return
        # No more than half the link's time until the next pass, so demand copies do not queue behind prefetches.
        budget = self._bandwidth("h2d") * self.swap_interval / 2
        victims = device_victims(self.tree, self.model, now)
        exchanging = True
        for node in prefetch_candidates(self.tree, self.model, now, self.prefetch_min_probability):
            if node.nbytes > budget:
                continue
            if self.tree.device_bytes + node.nbytes > target:
                if not exchanging:
                    continue
                written, exchanging = self._displace(victims, node, target, budget - node.nbytes, now)
                budget -= written
                if not exchanging:  # candidates come most valuable first: no later one is worth an exchange
                    continue
            self._bring_to_device(node, demand=False, keep=())
            self.counters["prefetches"] += 1
            budget -= node.nbytes

    def _displace(self, victims: Iterator[Node], node: Node, target: float, budget: float,
                  now: float) -> tuple[int, bool]:
        """Evict device leaves worth less per byte than ``node`` until it fits under ``target``, writing back
        no more than ``budget`` bytes; returns the bytes written back and whether ``node`` now fits."""
        value, written = self.model.device_value(node, now), 0
        while self.tree.device_bytes + node.nbytes > target:
            victim = next(victims, None)
            if victim is not None and victim is node.parent:  # a leaf only until ``node`` arrives
                continue
            if victim is None or self.model.device_value(victim, now) >= value:
                return written, False
            if victim.host is None and written + victim.nbytes > budget:
                return written, False
            written += victim.nbytes * (victim.host is None)
            self._evict_from_device(victim, {node}, demand=False)
        return written, True

    # ------------------------------------------------------------------ bandwidth

    def _bandwidth(self, kind: str) -> float:
        if kind in self._fixed_bandwidth:
            return self._fixed_bandwidth[kind]
        if kind == "source":
            moved, seconds = self._source_rate
            measured = moved / seconds if seconds > 0 else None
        else:
            measured = self.pool.bandwidth(kind)
        return measured or DEFAULT_BANDWIDTH[kind]

    def _record_source(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._source_rate[0] = self._source_rate[0] * _RATE_DECAY + nbytes
            self._source_rate[1] = self._source_rate[1] * _RATE_DECAY + seconds

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("LoraKVCache is closed")


def _view(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A byte tensor seen as a tensor of ``dtype`` and ``shape``."""
    return flat.view(dtype).view(shape)
