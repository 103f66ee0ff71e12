"""The replay's remote link with two queues: demand fetches go first, readahead fills what is left.

One link of ``bandwidth_Bps`` carries one transfer at a time, plus
``latency_s`` per fetch before its bytes arrive. Transfers are not
preempted: when the link frees, it takes the fetch issued by then that is
due first, where a demand fetch is due when issued and readahead
``slack_s`` later (default: one latency). Demand issued up to ``slack_s``
after queued readahead thus overtakes it, and readahead is never held back
longer than that: on a link that demand alone saturates (an open-loop
replay never slows a reader down), strict priority would starve every scan
of its readahead for good. A read that comes to need a queued readahead
block promotes it to the demand queue (its reader now waits for it). With
``demand_first=False`` there is one queue in issue order (the plain FIFO
link).

Time only moves forward: :meth:`run_until` starts every transfer that
begins before ``t`` and returns the arrivals so scheduled; a fetch submitted
at ``t`` is scheduled by a later call. Not thread-safe.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Hashable


class PriorityLink:
    """A simulated remote link that serves demand fetches before readahead."""

    def __init__(self, latency_s: float, bandwidth_Bps: float, *, demand_first: bool = True,
                 slack_s: float | None = None) -> None:
        if latency_s < 0 or not bandwidth_Bps > 0:
            raise ValueError("latency must be >= 0 and bandwidth > 0")
        self.latency_s = latency_s
        self.bandwidth_Bps = bandwidth_Bps
        self.demand_first = demand_first
        self.slack_s = latency_s if slack_s is None else slack_s
        self.free_at = 0.0
        self._seq = itertools.count()
        # token -> (issue time, seq, bytes), oldest first
        self._demand: OrderedDict[Hashable, tuple[float, int, int]] = OrderedDict()
        self._ahead: OrderedDict[Hashable, tuple[float, int, int]] = OrderedDict()

    def submit(self, ts: float, token: Hashable, nbytes: int, *, demand: bool) -> None:
        """Queue a fetch of ``nbytes`` issued at ``ts``, named by ``token`` (unique while queued)."""
        queue = self._demand if demand or not self.demand_first else self._ahead
        queue[token] = (ts, next(self._seq), nbytes)

    def promote(self, token: Hashable) -> None:
        """A read now waits for the queued readahead ``token``: it joins the demand queue, in issue order."""
        entry = self._ahead.pop(token, None)
        if entry is None:
            return
        self._demand[token] = entry
        items = sorted(self._demand.items(), key=lambda item: item[1][:2])
        self._demand = OrderedDict(items)

    def queued(self) -> int:
        """Fetches submitted and not yet started."""
        return len(self._demand) + len(self._ahead)

    def run_until(self, t: float) -> list[tuple[float, Hashable]]:
        """Start every transfer that begins before ``t``; return ``(arrival, token)`` of each."""
        out = []
        while self._demand or self._ahead:
            queue = self._next_queue()
            issued, _, nbytes = next(iter(queue.values()))
            start = max(self.free_at, issued)
            if start >= t:
                break
            token, _ = queue.popitem(last=False)
            self.free_at = start + nbytes / self.bandwidth_Bps
            out.append((self.free_at + self.latency_s, token))
        return out

    def _next_queue(self) -> OrderedDict:
        """The queue whose head the link takes next: of the heads issued by the time the
        link can start one, the one due first (readahead is due ``slack_s`` after issue)."""
        if not self._demand:
            return self._ahead
        if not self._ahead:
            return self._demand
        demand_ts = next(iter(self._demand.values()))[0]
        ahead_ts = next(iter(self._ahead.values()))[0]
        start = max(self.free_at, min(demand_ts, ahead_ts))
        if demand_ts > start:
            return self._ahead
        if ahead_ts > start:
            return self._demand
        return self._demand if demand_ts <= ahead_ts + self.slack_s else self._ahead
