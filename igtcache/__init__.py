"""igtcache: a unified, pattern-aware data cache for AI clusters."""
