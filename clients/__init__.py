"""igtcache.clients: see docs/architecture.md (not built yet)."""
