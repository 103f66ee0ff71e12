"""What the IGT policy knows about streams and blocks: an aging clock, the
streams themselves, and a bounded history of recently visited blocks.

Everything is counted in *ticks* (one per read) and aged exponentially: every
aging period the clock's epoch advances and every count halves. Counts are
stored with the epoch they were last updated in and decayed lazily
(:meth:`Clock.now`), so aging costs nothing per block. A decayed count divided
by the decayed number of ticks it was exposed to is a rate per tick.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from math import ldexp
from typing import Hashable

from igtcache.patterns import Pattern

#: Width of the confidence band on a stream's reuse count, in standard deviations.
Z = 2.0
#: Chance of calling an active stream idle over its lifetime (Poisson silences, Bonferroni).
IDLE_ALPHA = 0.01


class Clock:
    """Logical time: ``tick`` counts reads; ``epoch`` counts aging periods.

    ``exposure`` is the decayed number of ticks so far (it halves with every
    epoch), the denominator that turns a decayed count into a rate.
    """

    __slots__ = ("tick", "epoch", "exposure", "_next_age")

    def __init__(self, period: int) -> None:
        self.tick = 0
        self.epoch = 0
        self.exposure = 0.0
        self._next_age = period

    def advance(self, period: int) -> None:
        """One more read; start a new epoch (halving every count) every ``period`` ticks."""
        self.tick += 1
        self.exposure += 1.0
        if self.tick >= self._next_age:
            self._next_age = self.tick + period
            self.epoch += 1
            self.exposure *= 0.5

    def advance_in_epoch(self, reads: int) -> int:
        """Up to ``reads`` more reads that stay in the current epoch; return how many."""
        reads = min(reads, self._next_age - self.tick - 1)
        self.tick += reads
        self.exposure += reads
        return reads

    def now(self, count: float, epoch: int) -> float:
        """``count`` as last updated in ``epoch``, decayed to the current epoch."""
        return ldexp(count, epoch - self.epoch)


def silent(reads: float, exposure: float, gap: int) -> bool:
    """Whether ``gap`` ticks without a read mean a stream of ``reads`` in ``exposure`` ticks has stopped.

    At a Poisson rate ``r`` a silence of ``gap`` ticks has probability
    ``exp(-r * gap)``; a stream is tested again and again, so it is called
    idle only when the longest of its ``reads`` silences would be that long
    with probability below ``IDLE_ALPHA``.
    """
    return reads / exposure * gap > math.log(max(reads, 1.0) / IDLE_ALPHA)


class Stream:
    """One access stream at the granularity the tree chose: a (level path, region).

    The jobs reading it are pooled: a block two jobs share has the value of
    both. ``reuse`` counts the reads that would have hit an unbounded cache
    (re-visits of blocks in the history); ``footprint`` is the bytes of the
    history's blocks this stream owns. Their ratio, per tick, is the hit rate
    each byte given to the stream earns when all its blocks are alike: its
    ``value``. ``blocks`` holds its resident blocks when its label is
    sequential or random (least recently used first).
    """

    __slots__ = ("key", "label", "reuse", "reuse_epoch", "reads", "reads_epoch", "born", "born_epoch",
                 "footprint", "value", "low", "high", "idle", "blocks", "resident", "skewed", "heap_seq",
                 "last_tick", "dead")

    def __init__(self, key: Hashable, label: Pattern, clock: Clock) -> None:
        self.key = key
        self.label = label
        self.reuse = 0.0
        self.reuse_epoch = clock.epoch
        self.reads = 0.0
        self.reads_epoch = clock.epoch
        self.born = clock.exposure
        self.born_epoch = clock.epoch
        self.footprint = 0
        self.value = self.low = self.high = 0.0
        self.idle = False
        self.blocks: OrderedDict[Hashable, None] = OrderedDict()
        self.resident = 0  # bytes in ``blocks``
        self.skewed = 0  # resident blocks kept by frequency (the skewed class)
        self.heap_seq = -1
        self.last_tick = clock.tick
        self.dead = False  # dropped from the policy's table; holders look it up again

    def read(self, clock: Clock, reads: int = 1, tick: int | None = None) -> None:
        """``reads`` more reads of the stream in this epoch, the last at ``tick`` (default: now)."""
        self.reads = clock.now(self.reads, self.reads_epoch) + reads
        self.reads_epoch = clock.epoch
        self.last_tick = clock.tick if tick is None else tick

    def reused(self, clock: Clock, reads: int = 1) -> None:
        """``reads`` reads that an unbounded cache would have served."""
        self.reuse = clock.now(self.reuse, self.reuse_epoch) + reads
        self.reuse_epoch = clock.epoch

    def estimate(self, clock: Clock, weight: float) -> None:
        """Set ``value`` and its confidence bounds ``low``/``high``, times ``weight``.

        The reuse count is treated as Poisson: ``count +- Z * sqrt(count)``
        (plus one at the top, so a stream never seen reusing is not
        certainly worthless). Streams whose values differ by noise only
        thereby never displace each other's blocks.

        An idle stream is worth nothing: one whose silence since its last
        read would be improbable (Poisson, p < 0.01) at its own read rate
        has ended or paused, whatever it earned before (a job that finished).
        """
        exposure = max(clock.exposure - clock.now(self.born, self.born_epoch), 1.0)
        self.idle = silent(clock.now(self.reads, self.reads_epoch), exposure, clock.tick - self.last_tick)
        if self.idle:
            self.value = self.low = self.high = 0.0
            return
        count = clock.now(self.reuse, self.reuse_epoch)
        scale = weight / exposure / max(self.footprint, self.resident, 1)
        margin = Z * math.sqrt(count)
        self.value = count * scale
        self.low = max(0.0, count - margin) * scale
        self.high = (count + margin + 1.0) * scale


class Seen:
    """A block in the history: its owner stream, size and decayed visit count."""

    __slots__ = ("owner", "size", "count", "epoch")

    def __init__(self, owner: Stream, size: int, epoch: int) -> None:
        self.owner = owner
        self.size = size
        self.count = 1.0
        self.epoch = epoch

    def visited(self, clock: Clock) -> None:
        self.count = clock.now(self.count, self.epoch) + 1.0
        self.epoch = clock.epoch


class History:
    """The ``max_blocks`` most recently visited blocks, resident or not.

    It tells a first visit from a re-visit (reuse), estimates each stream's
    footprint, and keeps per-block counts for skewed streams, so a block can
    earn its way in before it is cached (admission by frequency).
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._seen: OrderedDict[Hashable, Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, key: Hashable) -> Seen | None:
        return self._seen.get(key)

    def entries(self, keys: list[Hashable]) -> list[Seen | None]:
        return list(map(self._seen.get, keys))

    def visit(self, key: Hashable, owner: Stream, size: int, clock: Clock) -> Seen | None:
        """Record a visit by ``owner``; return the entry as it was before, ``None`` if new."""
        seen = self._seen.get(key)
        if seen is None:
            self._seen[key] = Seen(owner, size, clock.epoch)
            owner.footprint += size
            if len(self._seen) > self.max_blocks:
                _, old = self._seen.popitem(last=False)
                old.owner.footprint -= old.size
            return None
        self._seen.move_to_end(key)
        if seen.owner is not owner:
            seen.owner.footprint -= seen.size
            owner.footprint += seen.size
            seen.owner = owner
        return seen

    def visit_many(self, keys: list[Hashable], entries: list[Seen | None], owners: list[Stream],
                   sizes: list[int], revisits: list[int], clock: Clock) -> None:
        """:meth:`visit` for distinct blocks, in the order of their last visit in this epoch.

        ``entries`` are the blocks as they were before (``None``: new),
        ``owners`` the streams of their last visits, and ``revisits`` the
        visits each adds to its count (:meth:`Seen.visited`) besides a new
        block's first.
        """
        seen, epoch = self._seen, clock.epoch
        for key, entry, owner, size, more in zip(keys, entries, owners, sizes, revisits):
            if entry is None:
                entry = seen[key] = Seen(owner, size, epoch)
                entry.count += more
                owner.footprint += size
                continue
            if entry.owner is not owner:
                entry.owner.footprint -= entry.size
                owner.footprint += entry.size
                entry.owner = owner
            if more:
                entry.count = clock.now(entry.count, entry.epoch) + more
                entry.epoch = epoch
        deque(map(seen.move_to_end, keys), maxlen=0)  # most recently visited last, in C
        while len(seen) > self.max_blocks:
            _, old = seen.popitem(last=False)
            old.owner.footprint -= old.size
