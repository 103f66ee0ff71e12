"""Cache policies: the decisions the engine delegates (eviction, admission, prefetch)."""

from .arc import ARC
from .base import Access, BlockKey, Insertion, Policy
from .belady import Belady, FutureOracle
from .fifo import FIFO
from .igt import IGT, IGTParams
from .lfu import LFU
from .lru import LRU
from .readahead import ScanReadahead, with_readahead
from .s3fifo import S3FIFO

POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy], *, clobber: bool = False) -> type[Policy]:
    """Register ``cls`` under its ``name`` (lower case); returns it, so it can decorate the class.

    A name already taken by another class is refused unless ``clobber``.
    """
    name = cls.name.lower()
    if not name:
        raise ValueError(f"{cls.__qualname__} has no name")
    held = POLICIES.get(name)
    if held is not None and held is not cls and not clobber:
        raise ValueError(f"policy {name!r} is already {held.__qualname__}; pass clobber=True to replace it")
    POLICIES[name] = cls
    return cls


for _cls in (LRU, FIFO, LFU, ARC, S3FIFO, Belady, IGT):
    register_policy(_cls)
for _cls in (LRU, FIFO, LFU, ARC, S3FIFO):  # the classical policies, paired with scan readahead
    register_policy(with_readahead(_cls))


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
    "Access", "BlockKey", "Insertion", "Policy", "LRU", "FIFO", "LFU", "ARC", "S3FIFO", "Belady", "FutureOracle", "IGT", "IGTParams",
    "LIVE_POLICIES", "POLICIES", "ScanReadahead", "make_policy", "register_policy", "with_readahead",
]
