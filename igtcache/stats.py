"""Counters the engine keeps: overall and per job."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass
class ReadCounters:
    """Read outcomes for one job, or for all of them."""

    reads: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_from_cache: int = 0
    remote_bytes: int = 0

    def add(self, *, hit: bool, requested: int, from_cache: int, remote: int) -> None:
        self.reads += 1
        self.hits += hit
        self.bytes_requested += requested
        self.bytes_from_cache += from_cache
        self.remote_bytes += remote

    def as_dict(self) -> dict:
        out = asdict(self)
        out["misses"] = self.reads - self.hits
        out["hit_ratio"] = self.hits / self.reads if self.reads else 0.0
        out["byte_hit_ratio"] = self.bytes_from_cache / self.bytes_requested if self.bytes_requested else 0.0
        return out


class CacheStats:
    """Everything ``Cache.stats()`` reports that is not read off the tiers."""

    def __init__(self) -> None:
        self.total = ReadCounters()
        self.jobs: dict[str, ReadCounters] = defaultdict(ReadCounters)
        self.remote_fetches = 0
        self.remote_bytes = 0  # every byte fetched, demand and prefetch
        self.remote_seconds = 0.0  # summed from issue to arrival, fetches overlapping
        self.evictions = 0
        self.corruptions = 0
        self.lost_blocks = 0
        self.disk_write_errors = 0
        self.remote_errors = 0
        self.prefetch_issued = 0
        self.prefetch_bytes = 0
        self.prefetch_used = 0
        self.prefetch_wasted_bytes = 0

    def record_read(self, job: str, *, hit: bool, requested: int, from_cache: int, remote: int) -> None:
        for counters in (self.total, self.jobs[job]):
            counters.add(hit=hit, requested=requested, from_cache=from_cache, remote=remote)

    def as_dict(self) -> dict:
        out = self.total.as_dict()
        out.update(
            remote_fetches=self.remote_fetches,
            remote_bytes=self.remote_bytes,
            remote_seconds=self.remote_seconds,
            evictions=self.evictions,
            corruptions=self.corruptions,
            lost_blocks=self.lost_blocks,
            disk_write_errors=self.disk_write_errors,
            remote_errors=self.remote_errors,
            prefetch={
                "issued": self.prefetch_issued,
                "bytes": self.prefetch_bytes,
                "used": self.prefetch_used,
                "wasted_bytes": self.prefetch_wasted_bytes,
            },
            jobs={job: c.as_dict() for job, c in self.jobs.items()},
        )
        return out
