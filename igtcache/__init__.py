"""igtcache: a unified, pattern-aware data cache for AI clusters."""

from igtcache.cache import Cache, CacheDirInUse
from igtcache.remote import RemoteError

__all__ = ["Cache", "CacheDirInUse", "RemoteError"]
