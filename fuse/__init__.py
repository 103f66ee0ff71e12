"""igtcache.fuse: see docs/architecture.md (not built yet)."""
