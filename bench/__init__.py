"""Benchmarks and workload tools (installed as igtcache.bench)."""
