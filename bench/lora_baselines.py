"""The two baselines of the LoRA benchmark, as byte-accounted simulations.

- ``VllmStyle``: separate pools as vLLM has them: a fixed share of HBM for
  adapter slots (LRU), the rest for KV blocks with prefix caching (LRU, keyed
  by adapter and hash chain, the tail of a sequence evicted before its head),
  and an LRU host cache of adapters. Evicted KV is dropped; KV stays in HBM
  when its adapter leaves (useless until the adapter comes back).
- ``SloraStyle``: one unified HBM pool as S-LoRA has it: adapters share it with
  the running request's KV, adapters come from an LRU host cache, and KV is
  freed when the request ends (no reuse across requests).
- ``Unbounded``: a bound, not a policy: HBM that keeps every adapter and every
  KV block ever seen, so only first reads of adapters and prefixes never seen
  before cost anything. No policy's TTFT can be lower on the same workload.

Each ``serve`` returns what the request's first token waits for: adapter bytes
copied host->device, adapter bytes read from the source, and the number of
prompt tokens whose KV was already cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from igtcache.bench.lora_workload import Request


@dataclass
class Served:
    h2d_bytes: int = 0       # adapter bytes host->device before prefill
    source_bytes: int = 0    # adapter bytes read from the source first
    matched_tokens: int = 0


class LruBytes:
    """Keys with sizes, least recently used first, bounded by bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0

    def __contains__(self, key) -> bool:
        return key in self.items

    def touch(self, key) -> None:
        self.items.move_to_end(key)

    def put(self, key, size: int, pinned=()) -> bool:
        """Insert (or touch) ``key``; evict LRU keys not in ``pinned`` to fit; ``False`` if it cannot fit."""
        if key in self.items:
            self.touch(key)
            return True
        if size > self.capacity:
            return False
        skipped = []
        while self.bytes + size > self.capacity and self.items:
            victim, victim_size = self.items.popitem(last=False)
            if victim in pinned:
                skipped.append((victim, victim_size))
            else:
                self.bytes -= victim_size
        for victim, victim_size in reversed(skipped):  # back at the cold end, in their order
            self.items[victim] = victim_size
            self.items.move_to_end(victim, last=False)
        if self.bytes + size > self.capacity:
            return False
        self.items[key] = size
        self.bytes += size
        return True


def _load_adapter(pool: LruBytes, host: LruBytes, name: str, size: int, served: Served) -> bool:
    """Make adapter ``name`` resident in ``pool`` through ``host`` (read from its source if the host lacks
    it), counting the transfers in ``served``; whether it is in ``pool`` now."""
    if name in pool:
        pool.touch(name)
        return True
    if name not in host:
        served.source_bytes = size
    host.put(name, size)
    served.h2d_bytes = size
    return pool.put(name, size)


class VllmStyle:
    def __init__(self, hbm_bytes: int, host_bytes: int, adapter_share: float, block_bytes: int, block_tokens: int) -> None:
        self.name = f"vLLM-style ({adapter_share:.0%} for adapters, LRU)"
        self.adapters = LruBytes(int(hbm_bytes * adapter_share))
        self.kv = LruBytes(hbm_bytes - self.adapters.capacity)
        self.host = LruBytes(host_bytes)
        self.block_bytes, self.block_tokens = block_bytes, block_tokens
        self.hbm_bytes = hbm_bytes

    def serve(self, request: Request, adapter_bytes: int) -> Served:
        served = Served()
        name = request.adapter
        if not _load_adapter(self.adapters, self.host, name, adapter_bytes, served):
            raise ValueError(f"adapter {name} does not fit vLLM's adapter share")
        prompt_blocks = request.prompt_len // self.block_tokens
        matched = 0
        while matched < prompt_blocks and (name, request.keys[matched]) in self.kv:
            matched += 1
        served.matched_tokens = matched * self.block_tokens
        for key in reversed(request.keys):  # the head of the sequence ends up most recent
            self.kv.put((name, key), self.block_bytes)
        return served

    def kv_without_adapter(self) -> int:
        return sum(size for (name, _), size in self.kv.items.items() if name not in self.adapters)


class SloraStyle:
    name = "S-LoRA-style (unified pool, no KV reuse)"

    def __init__(self, hbm_bytes: int, host_bytes: int, block_bytes: int) -> None:
        self.hbm = LruBytes(hbm_bytes)
        self.host = LruBytes(host_bytes)
        self.block_bytes = block_bytes
        self.hbm_bytes = hbm_bytes

    def serve(self, request: Request, adapter_bytes: int) -> Served:
        served = Served()
        name = request.adapter
        _load_adapter(self.hbm, self.host, name, adapter_bytes, served)
        # the running request's KV takes its place in the unified pool, then is freed
        running = ("kv", id(request))
        self.hbm.put(running, len(request.keys) * self.block_bytes, pinned={name})
        self.hbm.bytes -= self.hbm.items.pop(running, 0)
        return served

    def kv_without_adapter(self) -> int:
        return 0


class Unbounded:
    name = "bound: unbounded HBM (keeps everything)"

    def __init__(self, block_tokens: int) -> None:
        self.adapters: set[str] = set()
        self.kv: set[tuple[str, bytes]] = set()
        self.block_tokens = block_tokens
        self.hbm_bytes = 1  # run_baseline divides kv_without_adapter() (always 0) by it

    def serve(self, request: Request, adapter_bytes: int) -> Served:
        served = Served()
        name = request.adapter
        if name not in self.adapters:
            self.adapters.add(name)
            served.source_bytes = served.h2d_bytes = adapter_bytes
        matched, prompt_blocks = 0, request.prompt_len // self.block_tokens
        while matched < prompt_blocks and (name, request.keys[matched]) in self.kv:
            matched += 1
        served.matched_tokens = matched * self.block_tokens
        self.kv.update((name, key) for key in request.keys)
        return served

    def kv_without_adapter(self) -> int:
        return 0
