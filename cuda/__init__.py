"""igtcache.cuda: see docs/architecture.md (not built yet)."""
