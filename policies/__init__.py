"""Cache policies: the decisions the engine delegates (eviction, admission, prefetch)."""

from .base import Access, BlockKey, Policy
from .lru import LRU

POLICIES: dict[str, type[Policy]] = {LRU.name: LRU}


def make_policy(name: str, capacity: int) -> Policy:
    """Build a registered policy by name (e.g. ``"lru"``)."""
    try:
        cls = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return cls(capacity)


__all__ = ["Access", "BlockKey", "Policy", "LRU", "POLICIES", "make_policy"]
