"""A circuit breaker: after a run of failures, stop asking a node for a while.

States: *closed* (calls go through), *open* (calls are refused at once, for
``cooldown`` seconds after it opened), *half-open* (the cool-down is over: one
call, the probe, goes through; its success closes the circuit, its failure
opens it again). A probe whose outcome is never recorded (cancelled) is given
up after another ``cooldown``, so the breaker never sticks half-open.

Not thread-safe: the cluster tier uses its breakers on its event loop only.
"""

from __future__ import annotations

import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; probes again after ``cooldown`` seconds."""

    def __init__(self, failures: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError(f"need failures >= 1 and cooldown > 0, got {failures} and {cooldown}")
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        return OPEN if self._clock() - self._opened_at < self.cooldown else HALF_OPEN

    def allow(self) -> bool:
        """Whether a call may go to the node now (in half-open state: the one probe)."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        now = self._clock()
        if self._probe_at is not None and now - self._probe_at < self.cooldown:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        """The node answered (a miss or a refused command is an answer too)."""
        self._consecutive = 0
        self._opened_at = self._probe_at = None

    def failure(self) -> None:
        """The node did not answer in time, or the connection failed."""
        self._consecutive += 1
        if self._opened_at is not None or self._consecutive >= self.failures:
            if self._opened_at is None:
                self.times_opened += 1
            self._opened_at = self._clock()
            self._probe_at = None
