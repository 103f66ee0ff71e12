"""A bound on the response bytes the daemon holds at once, across every connection.

A read takes its size from the budget before the cache produces its bytes and
gives it back once the response has left (or the connection has failed). A
client that asks and never reads therefore holds at most its own response, and
all of them together at most the budget; a read that finds no room waits its
turn, in arrival order, for a bounded time, then fails with ``TimeoutError``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from igtcache.sizes import format_size


class Grant:
    """Bytes taken from a ``ResponseBudget``; give them back with ``release`` (idempotent)."""

    def __init__(self, budget: "ResponseBudget", nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Keep only ``nbytes`` (a read that returned fewer bytes than it asked for)."""
        if nbytes < self.nbytes:
            self._budget._give_back(self.nbytes - nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        self._budget._give_back(self.nbytes)
        self.nbytes = 0


class ResponseBudget:
    """At most ``limit`` bytes of responses in flight; ``acquire`` waits up to ``wait`` seconds for room."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.used = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting readers, first come first served

    def acquire(self, nbytes: int) -> Grant:
        """Take ``nbytes`` (at most ``limit``); ``TimeoutError`` if there is no room within ``wait``."""
        nbytes = min(nbytes, self.limit)
        deadline = time.monotonic() + self.wait
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._queue[0] is not me or self.used + nbytes > self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"the daemon holds {format_size(self.used)} of responses in flight, its --max-inflight "
                            f"of {format_size(self.limit)}, and no room came for {format_size(nbytes)} within "
                            f"{self.wait:g} s; retry, read smaller ranges, or raise --max-inflight")
                    self._cond.wait(remaining)
                self.used += nbytes
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
        return Grant(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()
