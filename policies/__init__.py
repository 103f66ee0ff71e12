"""Cache policies: the decisions the engine delegates (eviction, admission, prefetch)."""

from .arc import ARC
from .base import Access, BlockKey, Policy
from .belady import Belady, FutureOracle
from .fifo import FIFO
from .igt import IGT
from .lfu import LFU
from .lru import LRU
from .s3fifo import S3FIFO

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (LRU, FIFO, LFU, ARC, S3FIFO, Belady, IGT)
}


#: Policies a live cache can run (Belady needs the future, so only the replay has it).
LIVE_POLICIES = sorted(name for name, cls in POLICIES.items() if not getattr(cls, "needs_oracle", False))


def make_policy(name: str, capacity: int) -> Policy:
    """Build a registered policy by name (e.g. ``"lru"``)."""
    try:
        cls = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return cls(capacity)


__all__ = [
    "Access", "BlockKey", "Policy", "LRU", "FIFO", "LFU", "ARC", "S3FIFO", "Belady", "FutureOracle", "IGT",
    "LIVE_POLICIES", "POLICIES", "make_policy",
]
