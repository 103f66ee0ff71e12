"""igtcache: a unified, pattern-aware data cache for AI clusters."""

from igtcache.cache import Cache, CacheDirInUse
from igtcache.patterns import Pattern, classify
from igtcache.remote import RemoteError
from igtcache.stream_tree import AccessStreamTree

__all__ = ["AccessStreamTree", "Cache", "CacheDirInUse", "Pattern", "RemoteError", "classify"]
