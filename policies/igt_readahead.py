"""Readers and readahead for the IGT policy.

A :class:`Reader` is one job's reads of one object. It notices contiguous
reads (a scan), measures how fast the scan consumes bytes, and remembers how
far ahead blocks were already requested. :class:`Readahead` turns that rate
and the remote's measured fetch time into a depth: enough blocks in flight to
hide the fetch time, capped, and none that would arrive too late.
"""

from __future__ import annotations

import math
from typing import Hashable

from .igt_streams import Stream

#: Blocks ahead before any rate is known (a scan's first read).
DEFAULT_DEPTH = 4
#: Fetch time assumed before the first fetch is measured.
DEFAULT_FETCH_S = 0.05
#: Weight of a new measurement in the fetch-time average.
FETCH_EWMA = 0.1


class Reader:
    """One job's reads of one object.

    ``run`` counts the contiguous reads so far (1 after a jump); ``rate`` is
    the scan's consumption in bytes per second (``None`` until two reads of
    a run); ``upto`` the last block index requested ahead; ``current`` the
    block a scan is partway through (kept while the scan is in it).
    """

    __slots__ = ("end", "last_block", "run", "run_offset", "run_ts", "rate", "upto",
                 "current", "reuse_visit", "last_tick", "stream", "sequential")

    def __init__(self) -> None:
        self.end = -1
        self.last_block = -1
        self.run = 0
        self.run_offset = 0
        self.run_ts = 0.0
        self.rate: float | None = None
        self.upto = -1
        self.current: Hashable | None = None
        self.reuse_visit = False
        self.last_tick = 0
        self.stream: Stream | None = None
        self.sequential = False

    def advance(self, offset: int, size: int, ts: float) -> bool:
        """Account a read of ``size`` bytes at ``offset``; return whether it continues the previous one.

        A read continues when it starts where the previous one ended, or
        less than its own size past that (a strided scan).
        """
        contiguous = self.end >= 0 and 0 <= offset - self.end < size
        if contiguous:
            self.run += 1
            elapsed = ts - self.run_ts
            if elapsed > 0:
                self.rate = (offset - self.run_offset) / elapsed
        else:
            self.run = 1
            self.run_offset, self.run_ts = offset, ts
            self.upto = -1
        return contiguous


class Readahead:
    """Readahead depth from the remote's fetch time and a scan's consumption rate."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.fetch_s = DEFAULT_FETCH_S
        self._measured = False

    def observe_fetch(self, seconds: float) -> None:
        """A fetch took ``seconds`` (from issue to arrival, queueing included)."""
        if seconds < 0 or not math.isfinite(seconds):
            return
        if self._measured:
            self.fetch_s += FETCH_EWMA * (seconds - self.fetch_s)
        else:
            self.fetch_s, self._measured = seconds, True

    def window(self, rate: float | None, block_size: int, read_blocks: int, cap: int) -> tuple[int, int]:
        """Blocks ``(first, last)`` past a read's last block worth requesting now.

        A block ``d`` blocks ahead is needed ``d * block_size / rate`` seconds
        from now, so the first ``lead = fetch_s * rate / block_size`` blocks
        cannot arrive in time: they are left to demand fetches (a late
        prefetch is a miss for every read before it lands). Past the lead,
        one read's worth and one spare keep the scan fed; the window ends at
        ``cap`` (and ``max_depth``) blocks ahead, so a scan too fast for the
        cap gets no readahead. ``first > last`` means nothing to request.
        """
        if rate is None:
            return 1, min(cap, self.max_depth, DEFAULT_DEPTH)
        lead = math.ceil(self.fetch_s * rate / block_size)
        return lead + 1, min(cap, self.max_depth, lead + read_blocks + 1)
