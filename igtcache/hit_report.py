"""Hits that a client served itself, on their way to the daemon.

A client that reads the daemon's disk tier in its own process
(``igtcache.short_circuit``) appends each hit to a :class:`HitLog`; the log
is drained in batches and sent as one ``OP_REPORT`` frame, which the daemon
turns back into an :class:`~igtcache.residency.AccessBatch` for
``Cache.record_hits``. So the access stream tree, the policy and the stats see
every read, a little later.

Payload (little-endian): a header (remote length, job count, object count,
read count, reads dropped since the last report), the remote's name, each job
(u16 length, UTF-8), each object (size u64, path and version lengths u16 each,
UTF-8), then one column per field of the reads: job u16, object u32, offset
u64, size u64, time f64 (``CLOCK_MONOTONIC``, which the daemon's clock is).
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from igtcache.errors import BadRequest
from igtcache.residency import AccessBatch, BatchObject

#: Most bytes one report takes on the wire (the daemon refuses more).
MAX_REPORT = 1 << 20
#: A log holds at most this many reads waiting to be sent; more are dropped and counted.
MAX_WAITING = 1 << 16

_HEAD = struct.Struct("<HHIII")
_TEXT = struct.Struct("<H")
_OBJECT = struct.Struct("<QHH")
_COLUMNS = (("job", np.uint16), ("obj", np.uint32), ("offset", np.uint64), ("size", np.uint64), ("ts", np.float64))
_READ_BYTES = sum(np.dtype(t).itemsize for _, t in _COLUMNS)


@dataclass
class Report:
    """A decoded report: the remote it is for, its reads, and how many reads the client dropped."""

    remote: str
    batch: AccessBatch
    dropped: int


class HitLog:
    """Reads served in this process, waiting to be reported; thread-safe.

    ``add`` is the hit path's only cost: one append to a deque (atomic, no
    lock). ``take`` drains what one report can carry.
    Past ``MAX_WAITING`` reads (a daemon that does not take reports), new reads
    are dropped and counted, never blocking a read.
    """

    def __init__(self) -> None:
        self._reads: deque[tuple[str, str, str, int, int, int, float]] = deque()
        self._taking = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._reads)

    def add(self, job: str, path: str, version: str, object_size: int, offset: int, size: int, ts: float) -> None:
        if len(self._reads) >= MAX_WAITING:
            self.dropped += 1
            return
        self._reads.append((job, path, version, object_size, offset, size, ts))

    def take(self, remote: str) -> bytes | None:
        """One report's payload of the oldest waiting reads, or ``None`` if there are none."""
        with self._taking:
            if not self._reads and not self.dropped:
                return None
            budget = MAX_REPORT - _HEAD.size - len(remote.encode()) - 4096
            names: set[str] = set()
            reads = []
            while self._reads:
                _job, path, version, *_ = self._reads[0]
                cost = _READ_BYTES
                if path not in names:
                    names.add(path)
                    cost += _OBJECT.size + len(path.encode("utf-8", "surrogatepass")) + len(version.encode())
                if cost > budget:
                    break
                budget -= cost
                reads.append(self._reads.popleft())
            dropped, self.dropped = self.dropped, 0
        return encode_report(remote, reads, dropped)


def encode_report(remote: str, reads: list[tuple[str, str, str, int, int, int, float]], dropped: int = 0) -> bytes:
    """A report's payload: ``reads`` as ``(job, path, version, object size, offset, size, time)``."""
    jobs: dict[str, int] = {}
    objects: dict[tuple[str, str, int], int] = {}
    rows = [(jobs.setdefault(job, len(jobs)), objects.setdefault((path, version, osize), len(objects)), offset, size, ts)
            for job, path, version, osize, offset, size, ts in reads]
    if len(jobs) > 0xFFFF:
        raise ValueError("a report names at most 65535 jobs")
    raw_remote = remote.encode()
    parts = [_HEAD.pack(len(raw_remote), len(jobs), len(objects), len(rows), dropped), raw_remote]
    for job in jobs:
        raw = job.encode("utf-8", "surrogatepass")
        parts += [_TEXT.pack(len(raw)), raw]
    for path, version, osize in objects:
        raw_path, raw_version = path.encode("utf-8", "surrogatepass"), version.encode("utf-8", "surrogatepass")
        parts += [_OBJECT.pack(osize, len(raw_path), len(raw_version)), raw_path, raw_version]
    columns = list(zip(*rows)) if rows else [()] * len(_COLUMNS)
    parts += [np.asarray(values, dtype=dtype).tobytes() for values, (_, dtype) in zip(columns, _COLUMNS)]
    return b"".join(parts)


def decode_report(payload: bytes | memoryview) -> Report:
    """A report from its payload; ``BadRequest`` if it is malformed."""
    view = memoryview(payload)
    try:
        remote_len, n_jobs, n_objects, n_reads, dropped = _HEAD.unpack_from(view)
        at = _HEAD.size
        remote, at = _text(view, at, remote_len)
        jobs = []
        for _ in range(n_jobs):
            (length,) = _TEXT.unpack_from(view, at)
            job, at = _text(view, at + _TEXT.size, length)
            jobs.append(job)
        objects = []
        for _ in range(n_objects):
            size, path_len, version_len = _OBJECT.unpack_from(view, at)
            path, at = _text(view, at + _OBJECT.size, path_len)
            version, at = _text(view, at, version_len)
            objects.append(BatchObject(path, version, size))
        columns = {}
        for name, dtype in _COLUMNS:
            width = np.dtype(dtype).itemsize * n_reads
            if at + width > len(view):
                raise BadRequest("report is shorter than its header says")
            columns[name] = np.frombuffer(view[at:at + width], dtype=dtype)
            at += width
    except (struct.error, UnicodeDecodeError):
        raise BadRequest("malformed report of hits") from None
    if at != len(view):
        raise BadRequest("report is longer than its header says")
    if n_reads and (int(columns["job"].max()) >= n_jobs or int(columns["obj"].max()) >= n_objects):
        raise BadRequest("report names a job or object it does not list")
    if n_reads and not np.all(np.isfinite(columns["ts"])):
        raise BadRequest("report has a read without a finite time")
    batch = AccessBatch(jobs, objects, columns["job"].astype(np.intp), columns["obj"].astype(np.intp),
                        _int64(columns["offset"]), _int64(columns["size"]), columns["ts"].copy())
    return Report(remote, batch, dropped)


def _text(view: memoryview, at: int, length: int) -> tuple[str, int]:
    if at + length > len(view):
        raise BadRequest("report is shorter than its header says")
    return bytes(view[at:at + length]).decode("utf-8"), at + length


def _int64(column: np.ndarray) -> np.ndarray:
    if len(column) and int(column.max()) >= 1 << 62:
        raise BadRequest("report has an offset or size out of range")
    return column.astype(np.int64)
