"""The interface between the engine and a cache policy.

A policy decides *which blocks stay* in a bounded cache and *which blocks to
fetch ahead*. It owns residency bookkeeping (keys and sizes), never bytes: the
engine stores the bytes and asks the policy. The live cache and the trace
replay drive the very same objects through this interface.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Hashable, NamedTuple


class BlockKey(NamedTuple):
    """One cached block: block ``index`` of ``path`` at object ``version``."""

    path: str
    version: str
    index: int


@dataclass(frozen=True)
class Access:
    """One read as the cache saw it, hit or miss.

    ``first_block``..``last_block`` are the block indices the read touched;
    ``hint`` is an optional pattern hint from the client (e.g. "sequential").
    """

    ts: float
    job: str
    path: str
    version: str
    offset: int
    size: int
    object_size: int
    block_size: int
    first_block: int
    last_block: int
    hit: bool
    hint: str | None = None

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block + 1)


@dataclass(frozen=True)
class Insertion:
    """A block being made resident: the argument of every insertion hook.

    ``origin`` is what the policy found out about the key before making room
    (:meth:`Policy._arriving`): for ARC the ghost list it came from, for
    S3-FIFO whether it was a ghost, for IGT where it is to be kept.
    """

    key: Hashable
    size: int
    prefetched: bool = False
    origin: Any = None


class Policy(ABC):
    """Residency decisions for a cache of ``capacity`` bytes.

    The engine calls, for every read: :meth:`observe` once (hit or miss), then
    :meth:`touch` for each resident block used, :meth:`admit`/:meth:`insert`
    for each block fetched (and :meth:`observe_fetch` with how long the fetch
    took), and :meth:`prefetch` to learn what to fetch ahead.
    ``insert`` returns the blocks the policy evicted to make room; the engine
    drops their bytes. The policy never holds more than ``capacity`` bytes.
    """

    name = "policy"

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._sizes: dict[Hashable, int] = {}

    @property
    def label(self) -> str:
        """The policy as results name it: its name, with any parameters it was given."""
        return self.name

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[Hashable]:
        return list(self._sizes)

    def bind_streams(self, streams) -> None:
        """Called once with the ``AccessStreamTree`` that every access lands in first."""

    def observe(self, access: Access) -> None:
        """Every read reaches here, hit or miss, before blocks are touched."""

    def admit(self, key: Hashable, size: int, *, prefetched: bool = False) -> bool:
        """Whether a fetched block should be cached at all."""
        return size <= self.capacity

    def observe_fetch(self, nbytes: int, seconds: float) -> None:
        """A remote fetch of ``nbytes`` took ``seconds`` (lets a policy size readahead)."""

    def prefetch(self, access: Access) -> list[int]:
        """Block indices of ``access.path`` worth fetching ahead of demand."""
        return []

    def insert(self, key: Hashable, size: int, *, prefetched: bool = False) -> list[Hashable]:
        """Make ``key`` resident; return the keys evicted to make room."""
        if key in self._sizes:
            self.remove(key)
        return self._insert(self._arriving(key, size, prefetched))

    def to_evict(self, key: Hashable, size: int, *, prefetched: bool = False) -> list[Hashable]:
        """The keys :meth:`insert` would evict to make room for ``key`` now, changing nothing
        (as libCacheSim separates ``to_evict`` from ``evict``). Exact for every policy: it runs
        the insertion on a copy, so it costs a copy of the policy's state; for inspection and
        tests, not the hit path."""
        return copy.deepcopy(self).insert(key, size, prefetched=prefetched)

    def _insert(self, incoming: Insertion) -> list[Hashable]:
        """Evict until ``incoming`` fits, then make it resident; return the evicted keys."""
        evicted: list[Hashable] = []
        while self.used + incoming.size > self.capacity and self._sizes:
            victim = self._victim(incoming)
            self.remove(victim)
            evicted.append(victim)
        self._sizes[incoming.key] = incoming.size
        self.used += incoming.size
        self._on_insert(incoming)
        return evicted

    def _arriving(self, key: Hashable, size: int, prefetched: bool) -> Insertion:
        """What the policy finds out about a key about to be inserted (none by default)."""
        return Insertion(key, size, prefetched)

    def remove(self, key: Hashable) -> None:
        """Forget ``key`` (evicted, invalidated, or found corrupt)."""
        size = self._sizes.pop(key, None)
        if size is None:
            return
        self.used -= size
        self._on_remove(key)

    def worth_sharing(self, key: Hashable) -> bool:
        """Whether a block fetched from the remote is worth publishing to the cluster tier
        (other nodes are likely to read it); by default every block is."""
        return True

    def violations(self) -> list[str]:
        """Where the policy's own accounts disagree or its bound is broken (empty when sound)."""
        out = []
        if self.used != sum(self._sizes.values()):
            out.append(f"{self.name}: used {self.used} != {sum(self._sizes.values())} bytes of its blocks")
        if self.used > self.capacity:
            out.append(f"{self.name}: holds {self.used} bytes, over its capacity {self.capacity}")
        return out

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """A resident block was used."""

    @abstractmethod
    def _victim(self, incoming: Insertion) -> Hashable:
        """The resident key to evict next to make room for ``incoming``."""

    @abstractmethod
    def _on_insert(self, incoming: Insertion) -> None:
        """Record a newly resident key."""

    @abstractmethod
    def _on_remove(self, key: Hashable) -> None:
        """Drop bookkeeping for a key that left the cache."""
