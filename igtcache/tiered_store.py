"""The node-local tiers composed: a memory tier over an optional LMDB disk tier.

Owns what lies between the tiers: promotion (a disk hit enters the memory
tier while its block is still resident) and stores in progress (a block the
policy admitted is served from ``pending`` until its disk commit).

Which blocks are resident is the policy's decision, never the store's: with a
disk tier the policy governs the disk and the memory tier is an inclusive
LRU subset of the hottest blocks; without one the policy governs memory.

Concurrency: index changes (``place``, ``evict``, memory lookups) run under
the engine's lock, which the store is given; disk writes (``commit``,
``delete``) run under the engine's store lock and outside the engine lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from igtcache.block_store import BlockStore
from igtcache.disk_tier import DiskTier
from igtcache.memory_tier import MemoryTier
from igtcache.policies import BlockKey

log = logging.getLogger(__name__)

#: ``out`` of a read that returns its pieces unjoined (``Cache.read_pieces``).
PIECES = object()

Spans = dict[int, tuple[int, int]]


class TieredStore:
    """A memory tier over an optional disk tier, with promotion and stores in progress."""

    def __init__(self, memory: MemoryTier, disk: DiskTier | None, lock: threading.RLock) -> None:
        for tier in (memory, disk):
            if tier is not None and not isinstance(tier, BlockStore):
                raise TypeError(f"{type(tier).__name__} does not implement the BlockStore protocol")
        self.memory = memory
        self.disk = disk
        self._lock = lock
        self.pending: dict[BlockKey, bytes] = {}

    def from_memory(self, key: BlockKey) -> bytes | None:
        """A block from the memory tier or a store in progress (engine lock held)."""
        block = self.memory.get(key)
        return self.pending.get(key) if block is None else block

    def holds(self, key: BlockKey) -> bool:
        """Whether any tier has the block's bytes (engine lock held)."""
        return key in self.memory or key in self.pending or (self.disk is not None and key in self.disk)

    def place(self, key: BlockKey, data: bytes) -> None:
        """A block the policy admitted: serve it from memory now, until and after its disk commit (lock held)."""
        self.memory.put(key, data)
        if self.disk is not None:
            self.pending[key] = data

    def evict(self, key: BlockKey) -> None:
        """A block left the policy: drop it from memory (lock held); its disk copy goes in the next commit."""
        self.memory.discard(key)

    def commit(self, key: BlockKey, data: bytes, evicted: list[BlockKey]) -> None:
        """Write an admitted block and delete its victims in one disk transaction (store lock held).

        Raises ``DiskFull`` when the disk cannot take it; the block then stays memory-only.
        """
        if self.disk is None:
            return
        try:
            self.disk.write(puts=[(key, data)], deletes=evicted)
        finally:
            with self._lock:
                self.pending.pop(key, None)

    def delete(self, keys: list[BlockKey]) -> None:
        """Remove blocks from the disk tier (store lock held); ``DiskFull`` if it cannot write."""
        if self.disk is not None and keys:
            self.disk.write(deletes=keys)

    def join_with_disk(self, keys: list[BlockKey], pieces: dict, spans: Spans, out,
                       resident: Callable[[BlockKey], bool]) -> tuple[object, list[BlockKey], list[BlockKey]]:
        """Add disk-tier blocks to ``pieces`` and join them (into ``out`` if given) while
        their views are valid; promote each into memory if ``resident(key)`` still holds.

        Returns ``(joined, corrupt, lost)``; where some blocks failed their
        checksum or were gone, ``joined`` is ``None`` and the good pieces are
        copied out of the transaction for the caller to complete.
        """
        promote = self.memory.capacity > 0
        with self.disk.views(keys) as (views, corrupt):
            lost = [key for key in keys if key not in views and key not in corrupt]
            for key, view in views.items():
                if promote:
                    block = bytes(view)
                    with self._lock:
                        if resident(key):
                            self.memory.put(key, block)
                    pieces[key.index] = slice_block(block, *spans[key.index])
                elif out is PIECES:  # they leave the transaction
                    pieces[key.index] = bytes(view[slice(*spans[key.index])])
                else:
                    pieces[key.index] = view[slice(*spans[key.index])]
            if not corrupt and not lost:
                return join(pieces, out), [], []
            for key in views:
                pieces[key.index] = bytes(pieces[key.index])  # outlive the transaction
        return None, corrupt, lost

    def keys(self) -> set[BlockKey]:
        """Every key any tier holds (engine lock held)."""
        held = set(self.memory.keys()) | set(self.pending)
        if self.disk is not None:
            held |= set(self.disk.keys())
        return held

    def violations(self, resident: set[BlockKey]) -> list[str]:
        """Where the tiers disagree with the policy's ``resident`` set or break a bound
        (engine and store locks held, so no store is in progress)."""
        out = []
        for name, tier in (("memory", self.memory), ("disk", self.disk)):
            if tier is None:
                continue
            if tier.bytes > tier.capacity:
                out.append(f"{name} tier holds {tier.bytes} bytes, over its bound of {tier.capacity}")
            stray = set(tier.keys()) - resident
            if stray:
                out.append(f"{name} tier holds {len(stray)} blocks the policy does not, e.g. {next(iter(stray))}")
        if self.pending:
            out.append(f"{len(self.pending)} stores in progress while the store lock is held")
        if self.disk is None and set(self.memory.keys()) != resident:
            missing = resident - set(self.memory.keys())
            if missing:
                out.append(f"policy holds {len(missing)} blocks no tier has, e.g. {next(iter(missing))}")
        return out


def slice_block(block: bytes, lo: int, hi: int) -> bytes | memoryview:
    """``block[lo:hi]`` without a copy (the whole block itself where it is all wanted)."""
    return block if lo == 0 and hi == len(block) else memoryview(block)[lo:hi]


def join(blocks: dict[int, bytes | memoryview], out=None):
    """One ``bytes`` from the pieces in block order, or, with ``out``, the pieces
    copied into it and their total length, or with ``out`` ``PIECES`` the
    pieces themselves; each byte is copied at most once."""
    pieces = [blocks[index] for index in sorted(blocks)]
    if out is PIECES:
        return pieces
    if out is not None:
        position = 0
        for piece in pieces:
            out[position:position + len(piece)] = piece
            position += len(piece)
        return position
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)
