"""The tier interfaces: what every place that holds blocks offers the engine.

Two shapes, because tiers differ in what a lookup may cost:

* :class:`BlockStore` is a node-local tier (memory, LMDB disk): lookups are
  synchronous and fast, writes may fail (``TierFull``), and the tier can list
  what it holds so that its account can be checked against the policy's.
* :class:`BlockSource` is a tier behind a network (the cluster tier, the
  remote itself): a lookup returns a future, may fail and may be slow. A
  source that does not hold a block resolves the future to ``None``; one that
  fails resolves it to ``None`` as well when it is only an accelerator (the
  cluster tier), or raises when it is the origin (the remote).

Keys are :class:`igtcache.policies.BlockKey` (path, version, index); a tier
never decides residency: the policy does, through the tiered store.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterable, Protocol, runtime_checkable

from igtcache.policies import BlockKey


class TierFull(OSError):
    """A tier could not take a write: its file system, map or byte bound is full."""


@runtime_checkable
class BlockStore(Protocol):
    """A node-local tier of immutable blocks, bounded by bytes."""

    capacity: int

    @property
    def bytes(self) -> int:
        """Bytes of blocks held now."""

    def __contains__(self, key: BlockKey) -> bool: ...

    def __len__(self) -> int: ...

    def get(self, key: BlockKey) -> bytes | None:
        """The block's bytes (verified where the tier can be damaged), or ``None``."""

    def put(self, key: BlockKey, data: bytes) -> None:
        """Hold ``data`` for ``key``; ``TierFull`` if it cannot."""

    def discard(self, key: BlockKey) -> None:
        """Drop ``key`` if held."""

    def keys(self) -> Iterable[BlockKey]:
        """Every key held now (for the invariant check and restarts)."""


@runtime_checkable
class BlockSource(Protocol):
    """A tier reached over a network: asynchronous, fallible, possibly slow."""

    def fetch_block(self, key: BlockKey, start: int, end: int) -> concurrent.futures.Future:
        """A future of bytes ``[start, end)`` of ``key``'s object at ``key.version``, or of ``None``
        where this source does not hold them."""
