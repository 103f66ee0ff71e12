"""Caps on what one dataset or tenant (a path prefix) may hold in a node's tiers.

The policy decides what the cache keeps overall; a quota only bounds the
share of one prefix. When a block admitted under a prefix takes it past its
cap, blocks of that prefix leave, least recently read first (the new block
last), until it fits. A path falls under the longest prefix that contains it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from igtcache.policies import BlockKey
from igtcache.remote import normalize_path


def parse_quota(text: str) -> tuple[str, int]:
    """``PREFIX=SIZE`` (e.g. ``train/imagenet=200GiB``) as ``(prefix, bytes)``; ``ValueError`` saying
    what is expected otherwise."""
    from igtcache.sizes import parse_size

    prefix, sep, size = text.rpartition("=")
    if not sep or not size:
        raise ValueError(f"a quota is PREFIX=SIZE, e.g. train/imagenet=200GiB, not {text!r}")
    return normalize_path(prefix), parse_size(size)


class Quotas:
    """Per-prefix byte caps and what each prefix holds (not thread-safe: the engine's lock guards it)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = {normalize_path(prefix): limit for prefix, limit in limits.items()}
        for prefix, limit in self.limits.items():
            if limit < 0:
                raise ValueError(f"quota for {prefix!r} must be a size of 0 or more, not {limit}")
        self._longest_first = sorted(self.limits, key=len, reverse=True)
        self.used = dict.fromkeys(self.limits, 0)
        self.evictions = dict.fromkeys(self.limits, 0)
        self._blocks: dict[str, OrderedDict[BlockKey, int]] = {p: OrderedDict() for p in self.limits}
        self._of_path: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return bool(self.limits)

    def of(self, path: str) -> str | None:
        """The prefix whose quota ``path`` counts against, if any."""
        if not self.limits:
            return None  # the engine's every store and eviction asks: no lookup without quotas
        found = self._of_path.get(path, "")
        if found != "":
            return found
        found = next((p for p in self._longest_first if not p or path == p or path.startswith(p + "/")), None)
        if len(self._of_path) >= 1 << 16:
            self._of_path.clear()
        self._of_path[path] = found
        return found

    def add(self, key: BlockKey, size: int) -> None:
        """A block became resident."""
        prefix = self.of(key.path)
        if prefix is not None and key not in self._blocks[prefix]:
            self._blocks[prefix][key] = size
            self.used[prefix] += size

    def remove(self, key: BlockKey) -> None:
        """A block left the tiers."""
        prefix = self.of(key.path)
        if prefix is not None:
            size = self._blocks[prefix].pop(key, None)
            if size is not None:
                self.used[prefix] -= size

    def touch(self, key: BlockKey) -> None:
        """A resident block was read."""
        prefix = self.of(key.path)
        if prefix is not None and key in self._blocks[prefix]:
            self._blocks[prefix].move_to_end(key)

    def over(self, newest: BlockKey) -> list[BlockKey]:
        """Blocks to evict so that ``newest``'s prefix fits its cap: least recently read first,
        ``newest`` itself only if the others are not enough. Counted as evictions."""
        prefix = self.of(newest.path)
        if prefix is None:
            return []
        excess = self.used[prefix] - self.limits[prefix]
        victims = []
        for key, size in self._blocks[prefix].items():
            if excess <= 0:
                break
            if key != newest:
                victims.append(key)
                excess -= size
        if excess > 0:
            victims.append(newest)
        self.evictions[prefix] += len(victims)
        return victims

    def report(self) -> dict[str, dict[str, Any]]:
        """Each quota's limit, bytes and blocks held, and evictions it caused."""
        return {prefix: {"limit": self.limits[prefix], "used": self.used[prefix],
                         "blocks": len(self._blocks[prefix]), "evictions": self.evictions[prefix]}
                for prefix in sorted(self.limits)}
