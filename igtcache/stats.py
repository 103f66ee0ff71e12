"""Counters the engine keeps: overall and per job.

The read driver (``igtcache.read_driver``) keeps the read outcomes for the
live cache and the trace replay alike, so both report the same figures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, fields


@dataclass
class ReadCounters:
    """Read outcomes for one job, or for all of them.

    Remote, cluster and prefetch figures are charged to the job whose read
    (or explicit prefetch) caused the fetch; ``remote_*`` counts what came
    from the remote itself, ``cluster_*`` what the cluster tier served.
    """

    reads: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_from_cache: int = 0
    remote_bytes: int = 0
    remote_fetches: int = 0
    cluster_bytes: int = 0
    cluster_fetches: int = 0
    prefetch_issued: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0
    prefetch_late: int = 0
    prefetch_wasted_bytes: int = 0

    def add(self, other: "ReadCounters") -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict:
        out = asdict(self)
        out["misses"] = self.reads - self.hits
        out["hit_ratio"] = self.hits / self.reads if self.reads else 0.0
        out["byte_hit_ratio"] = self.bytes_from_cache / self.bytes_requested if self.bytes_requested else 0.0
        return out


class JobCounters:
    """:class:`ReadCounters` per job and in total; ``count(job, field, n)`` adds to both."""

    def __init__(self) -> None:
        self.total = ReadCounters()
        self.jobs: dict[str, ReadCounters] = defaultdict(ReadCounters)

    def count(self, job: str, field: str, n: int = 1) -> None:
        for counters in (self.total, self.jobs[job]):
            setattr(counters, field, getattr(counters, field) + n)


class CacheStats(JobCounters):
    """Everything ``Cache.stats()`` reports that is not read off the tiers."""

    def __init__(self) -> None:
        super().__init__()
        self.remote_seconds = 0.0  # summed from issue to arrival, fetches overlapping
        self.evictions = 0
        self.corruptions = 0
        self.lost_blocks = 0
        self.disk_write_errors = 0
        self.remote_errors = 0
        self.version_changes = 0

    def as_dict(self) -> dict:
        total = self.total.as_dict()
        out = {k: v for k, v in total.items() if not k.startswith("prefetch_")}
        out.update(
            remote_seconds=self.remote_seconds,
            evictions=self.evictions,
            corruptions=self.corruptions,
            lost_blocks=self.lost_blocks,
            disk_write_errors=self.disk_write_errors,
            remote_errors=self.remote_errors,
            version_changes=self.version_changes,
            prefetch={
                "issued": self.total.prefetch_issued,
                "bytes": self.total.prefetch_bytes,
                "used": self.total.prefetch_used,
                "late": self.total.prefetch_late,
                "wasted_bytes": self.total.prefetch_wasted_bytes,
            },
            jobs={job: c.as_dict() for job, c in self.jobs.items()},
        )
        return out
