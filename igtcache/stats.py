"""Counters the engine keeps: overall and per job.

The read driver (``igtcache.read_driver``) keeps the read outcomes for the
live cache and the trace replay alike, so both report the same figures.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

#: The per-job entry that the counts of jobs past ``max_jobs`` are folded into.
OTHER = "(other)"


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
    """:class:`ReadCounters` per job and in total; ``count(job, field, n)`` adds to both.

    Bounded: once ``2 * max_jobs`` jobs are counted, all but the ``max_jobs``
    with the most reads are folded into one entry, ``"(other)"`` (a folded job
    seen again starts a new entry); :meth:`ranked` folds down to ``max_jobs``
    for reporting. The total is always exact.
    """

    def __init__(self, max_jobs: int = 1000) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self.total = ReadCounters()
        self.jobs: dict[str, ReadCounters] = {}

    def count(self, job: str, field: str, n: int = 1) -> None:
        counters = self.jobs.get(job)
        if counters is None:
            if len(self.jobs) >= 2 * self.max_jobs:
                self.jobs = self.ranked()
            counters = self.jobs.setdefault(job, ReadCounters())
        setattr(counters, field, getattr(counters, field) + n)
        setattr(self.total, field, getattr(self.total, field) + n)

    def ranked(self) -> dict[str, ReadCounters]:
        """The jobs, with all but the ``max_jobs`` with the most reads folded into ``"(other)"``
        (as they are, in the order first counted, when there are no more than that)."""
        jobs = {job: c for job, c in self.jobs.items() if job != OTHER}
        if len(jobs) <= self.max_jobs:
            return dict(self.jobs)
        ranked = sorted(jobs.items(), key=lambda item: item[1].reads, reverse=True)
        other = copy.copy(self.jobs.get(OTHER, ReadCounters()))
        for _job, counters in ranked[self.max_jobs:]:
            other.add(counters)
        return {**dict(ranked[:self.max_jobs]), OTHER: other}


class CacheStats(JobCounters):
    """Everything ``Cache.stats()`` reports that is not read off the tiers."""

    def __init__(self, max_jobs: int = 1000) -> None:
        super().__init__(max_jobs)
        self.remote_seconds = 0.0  # summed from issue to arrival, fetches overlapping
        self.evictions = 0
        self.corruptions = 0
        self.lost_blocks = 0
        self.disk_write_errors = 0
        self.remote_errors = 0
        self.version_changes = 0

    def copy(self) -> "CacheStats":
        """A copy that later counts do not change: taken under the engine's lock, formatted outside it."""
        out = copy.copy(self)
        out.total = copy.copy(self.total)
        out.jobs = {job: copy.copy(counters) for job, counters in self.jobs.items()}
        return out

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
            jobs={job: c.as_dict() for job, c in self.ranked().items()},
        )
        return out
