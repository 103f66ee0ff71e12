"""IGT: the pattern-aware policy, driven by the AccessStreamTree (issue 4).

Every read is attributed to a *stream*: the level the tree says to act on
(region, file or directory; all jobs pooled), raised to the highest random
ancestor when it is random. Each resident block has a *value*, the hits per
byte per tick it is expected to earn, implied by its stream's pattern;
eviction takes the block of the lowest-valued class, and admission refuses a
block unless it is clearly worth more than that (confidence bounds plus
hysteresis). Space is thereby allocated by marginal hit gain per byte with
one comparison (docs/igt.md has the full design).

* **Sequential and random streams** ("uniform" classes): every block of the
  stream is worth the same, ``reuse rate / footprint`` -- the reads an
  unbounded cache would have served, per byte the stream touches. A one-pass
  scan reuses nothing and is worth ~0: its blocks go first. A loop or an
  epoch reshuffle is worth ``rate / footprint``, so no block of it displaces
  another: the stream keeps a stable subset instead of churning, and the
  most recently used block goes first (a loop needs it last). Sequential
  streams are discounted: readahead serves them anyway.
* **Skewed streams**: per-block visit counts, kept in the history for blocks
  not resident too and halved every aging period, so a block earns its way
  in by frequency and a shifted hot set takes over within a few periods.
* **Unknown streams**: an ARC instance holds their blocks, valued by its own
  hits per byte. With no label anywhere IGT is exactly ARC.
* **Readahead**: a contiguous reader is prefetched far enough ahead to hide
  the measured fetch time at its consumption rate, and no nearer (a block
  that cannot arrive in time is left to a demand fetch). Prefetched blocks
  not yet read, and the block a scan is partway through, are *protected*
  (evicted only when nothing else is left) within a share of capacity.

Values are refreshed every few hundred reads (:meth:`IGT._rebalance`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from typing import Hashable

from igtcache.patterns import Pattern

from .arc import ARC
from .base import Access, BlockKey, Policy
from .igt_readahead import Reader, Readahead
from .igt_streams import Clock, History, Stream, silent

#: Shortest aging period (ticks); it also grows with the resident blocks.
MIN_AGING_PERIOD = 1024
AGING_PER_BLOCK = 8
#: Values are refreshed at least every this many reads (more with many streams);
#: early on after 16, 32, 64 ... reads, so a short run is not valued at zero.
REBALANCE_EVERY = 64
FIRST_REBALANCE = 16
#: History size: at least this many blocks, and this many per block of capacity.
HISTORY_MIN = 65_536
HISTORY_PER_BLOCK = 4
#: A block displaces another only if worth this much more (no churn on noise).
HYSTERESIS = 0.1
#: Weight of a sequential stream's reuse: readahead would serve it anyway.
SEQ_DISCOUNT = 0.25
#: Share of capacity that protected (prefetched or in-use) blocks may hold.
PROTECT_SHARE = 0.25
#: Readahead cap in blocks, and as a share of capacity per reader.
MAX_DEPTH = 64
READER_SHARE = 8
#: A reader idle this many ticks is forgotten and its protected blocks released.
READER_IDLE = 8192
#: A protected block is released after this many ticks whatever happens.
STALE = 65_536
#: The tree's act level is asked again after this many uses or ticks.
LEVEL_USES = 16
LEVEL_TTL = 4096
MAX_LEVELS = 65_536
#: Jobs remembered as scanners (reading objects front to back).
MAX_JOBS = 4096

_PROTECTED, _UNIFORM, _SKEWED, _POOL = range(4)
_NO_REGION = 1 << 62
_HINTS = {p.value: p for p in Pattern}


class _Resident:
    """A resident block: owner stream, size, where it is kept, and who protects it."""

    __slots__ = ("stream", "size", "place", "reader", "since")

    def __init__(self, stream: Stream, size: int) -> None:
        self.stream = stream
        self.size = size
        self.place = -1
        self.reader: Reader | None = None
        self.since = 0


class _Request:
    """A block requested ahead and not yet inserted."""

    __slots__ = ("stream", "reader", "tick", "size", "read")

    def __init__(self, stream: Stream, reader: Reader, tick: int, size: int) -> None:
        self.stream = stream
        self.reader = reader
        self.tick = tick
        self.size = size
        self.read = False  # read before it arrived (the engine inserts on arrival)


def _class_of(label: Pattern) -> int:
    if label is Pattern.SKEWED:
        return _SKEWED
    if label is Pattern.UNKNOWN:
        return _POOL
    return _UNIFORM


class IGT(Policy):
    """Pattern-aware eviction, admission, allocation and readahead.

    ``readahead=False`` turns prefetching off (residency decisions only).
    """

    name = "igt"

    def __init__(self, capacity: int, *, readahead: bool = True) -> None:
        super().__init__(capacity)
        self.readahead = readahead
        self._clock = Clock(MIN_AGING_PERIOD)
        self._tree = None
        self._history = History(HISTORY_MIN)
        self._streams: dict[Hashable, Stream] = {}
        self._readers: OrderedDict[tuple[str, Hashable], Reader] = OrderedDict()  # least recently used first
        # (path, or directory of a one-block object; job; region) -> [stream key, label, uses left, expiry, deep]
        self._levels: dict[tuple, list] = {}
        self._scanning: dict[Hashable, float | None] = {}  # job reading objects front to back -> its rate
        self._blocks: dict[Hashable, _Resident] = {}
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        self._protected_bytes = 0
        self._protect_budget = int(capacity * PROTECT_SHARE)
        self._pinned: dict[Hashable, Reader] = {}  # block a scan is partway through -> the scan
        self._requested: dict[Hashable, _Request] = {}
        self._requested_bytes = 0
        self._pool = ARC(capacity)
        self._pool_value = 0.0
        self._pool_hits = 0.0  # decayed reads of blocks in the pool
        self._pool_hits_epoch = 0
        self._pool_hit_tick = 0
        self._uheap: list[tuple[float, float, int, Stream]] = []  # uniform streams by value, then upper bound
        self._sheap: list[tuple[float, int, Hashable]] = []  # skewed blocks by log2 value + epoch
        self._skew: dict[Hashable, tuple[float, int]] = {}
        self._seq = itertools.count()
        self._readahead = Readahead(MAX_DEPTH)
        self._next_rebalance = FIRST_REBALANCE
        self._orphans = Stream(None, Pattern.UNKNOWN, self._clock)
        self._block_size = 0
        self._incoming: tuple[_Resident, Reader | None, bool] | None = None  # insert() -> _on_insert()

    # -- the engine's calls ------------------------------------------------

    def bind_streams(self, streams) -> None:
        self._tree = streams

    def observe(self, access: Access) -> None:
        clock = self._clock
        clock.advance(max(MIN_AGING_PERIOD, AGING_PER_BLOCK * len(self._blocks)))
        if clock.tick >= self._next_rebalance:
            self._rebalance()
        bs = access.block_size
        if bs != self._block_size:
            self._block_size = bs
            self._history.max_blocks = max(HISTORY_MIN, HISTORY_PER_BLOCK * self.capacity // bs)
        reader = self._reader(access)
        stream = reader.stream
        end = min(access.offset + access.size, access.object_size)
        partial = None
        if reader.sequential and end < access.object_size and end % bs:
            partial = BlockKey(access.path, access.version, access.last_block)
        if reader.current is not None and reader.current != partial:
            self._unpin(reader)

        history, blocks = self._history, self._blocks
        for index in access.blocks:
            key = BlockKey(access.path, access.version, index)
            seen = history.visit(key, stream, min(bs, access.object_size - index * bs), clock)
            if seen is None:
                reuse = False
            elif index == reader.last_block and reader.run >= 2:  # a scan still in its block: same visit
                reuse = reader.reuse_visit
            else:
                reuse = True
                seen.visited(clock)
            if reuse:
                stream.reused(clock)
            reader.reuse_visit = reuse
            blk = blocks.get(key)
            if blk is not None:
                self._used(key, blk, stream, reader, key == partial)
            else:
                request = self._requested.get(key)
                if request is not None:
                    request.read = True
        if access.last_block >= access.first_block:
            reader.last_block = access.last_block
        reader.end = end
        if partial is not None:
            reader.current = partial
            self._pinned[partial] = reader

    def touch(self, key: Hashable) -> None:
        pass  # observe() has already accounted every block of the read

    def observe_fetch(self, nbytes: int, seconds: float) -> None:
        self._readahead.observe_fetch(seconds)

    def admit(self, key: Hashable, size: int, *, prefetched: bool = False) -> bool:
        if size > self.capacity:
            return False
        if prefetched:
            return True  # insert() protects it if the budget allows, else keeps it by value
        if self.used + size <= self.capacity or key in self._pinned:
            return True
        seen = self._history.get(key)
        if seen is None:
            return True
        best = self._min_class()
        if best is None:
            return False  # everything resident is protected
        value, place, holder = best
        stream = seen.owner
        kind = _class_of(stream.label)
        if kind == _UNIFORM and place == _UNIFORM and holder is stream:
            return False  # a stable subset: no block of the stream is worth more than another
        if (holder.low if place == _UNIFORM else value) <= 0.0:
            return True  # the victim's worth is not established: the newer block wins, as in LRU
        if kind == _POOL:
            if place == _POOL:
                return True  # ARC decides among its own blocks
            low = self._pool_value
        elif kind == _UNIFORM:
            low = stream.low
        else:
            low = self._clock.now(seen.count, seen.epoch) / seen.size / max(self._clock.exposure, 1.0)
        return low > self._high(best) * (1.0 + HYSTERESIS)

    def _high(self, best: tuple[float, int, object]) -> float:
        """The most the block ``_min_class`` would evict may be worth."""
        value, place, holder = best
        return holder.high if place == _UNIFORM else value

    def prefetch(self, access: Access) -> list[int]:
        if not self.readahead:
            return []
        reader = self._readers.get((access.path, access.job))
        if reader is None or not reader.sequential:
            return []
        bs = access.block_size
        last = -(-access.object_size // bs) - 1
        cap = max(1, self.capacity // (READER_SHARE * bs))
        rate = reader.rate if reader.rate is not None else self._scanning.get(access.job)
        first, depth = self._readahead.window(rate, bs, access.last_block - access.first_block + 1, cap)
        stop = min(access.last_block + depth, last)
        out = []
        for index in range(max(access.last_block + first, reader.upto + 1), stop + 1):
            key = BlockKey(access.path, access.version, index)
            if key in self._sizes or key in self._requested:
                reader.upto = index
                continue
            size = min(bs, access.object_size - index * bs)
            if not self._protectable(size):
                break
            self._requested[key] = _Request(reader.stream, reader, self._clock.tick, size)
            self._requested_bytes += size
            reader.upto = index
            out.append(index)
        return out

    # -- Policy hooks ------------------------------------------------------

    def _victim(self, incoming: Hashable) -> Hashable:
        best = self._min_class()
        if best is None:
            return next(iter(self._protected))
        _, place, holder = best
        if place == _UNIFORM:
            return next(reversed(holder.blocks))  # most recently used: needed last by a loop or an epoch
        if place == _SKEWED:
            return holder
        return self._pool._victim(incoming)

    def insert(self, key: Hashable, size: int, *, prefetched: bool = False) -> list[Hashable]:
        if key in self._sizes:
            self.remove(key)
        request = self._requested.pop(key, None)
        if request is not None:
            self._requested_bytes -= request.size
            stream, guard, unread = request.stream, request.reader, not request.read
        else:
            seen = self._history.get(key)
            stream = seen.owner if seen is not None else self._orphans
            guard, unread = None, prefetched
        pinned = self._pinned.get(key)
        if pinned is not None:
            guard, unread = pinned, True
        blk = _Resident(stream, size)
        if not unread and _class_of(stream.label) == _POOL and self._pool.used == self.used:
            # ARC holds every resident block: it makes room itself, exactly as ARC alone would.
            evicted = self._pool.insert(key, size)
            for victim in evicted:
                self.remove(victim)
            self._sizes[key] = size
            self.used += size
            blk.place = _POOL
            self._blocks[key] = blk
            return evicted
        self._incoming = (blk, guard, unread)
        return super().insert(key, size, prefetched=prefetched)

    def _on_insert(self, key: Hashable, size: int, prefetched: bool) -> None:
        blk, guard, unread = self._incoming
        self._blocks[key] = blk
        if not (unread and self._protect(key, blk, guard)):
            self._place(key, blk, blk.stream)

    def _on_remove(self, key: Hashable) -> None:
        self._unplace(key, self._blocks.pop(key))

    def worth_sharing(self, key: Hashable) -> bool:
        """Not a one-pass scan's block: a sequential stream that re-reads nothing
        would spend the cluster's memory on bytes nobody asks for again."""
        blk = self._blocks.get(key)
        seen = self._history.get(key) if blk is None else None
        stream = blk.stream if blk is not None else seen.owner if seen is not None else None
        return stream is None or not (stream.label is Pattern.SEQUENTIAL and stream.value <= 0.0)

    def violations(self) -> list[str]:
        out = super().violations()
        if self._blocks.keys() != self._sizes.keys():
            out.append(f"igt: {len(self._blocks)} valued blocks against {len(self._sizes)} resident")
        places = {
            _PROTECTED: set(self._protected),
            _UNIFORM: {k for s in self._streams.values() for k in s.blocks} | set(self._orphans.blocks),
            _SKEWED: set(self._skew),
            _POOL: set(self._pool.keys()),
        }
        for key, blk in self._blocks.items():
            if key not in places.get(blk.place, ()):
                out.append(f"igt: {key} is placed in class {blk.place} but not held there")
                break
        held = sum(len(keys) for keys in places.values())
        if held != len(self._blocks):
            out.append(f"igt: classes hold {held} blocks, {len(self._blocks)} resident")
        protected = sum(self._blocks[k].size for k in self._protected if k in self._blocks)
        if protected != self._protected_bytes:
            out.append(f"igt: protected bytes {self._protected_bytes} != {protected}")
        return out + [f"igt pool: {v}" for v in self._pool.violations()]

    # -- readers and streams -----------------------------------------------

    def _reader(self, access: Access) -> Reader:
        """The reader of ``access``, advanced past it, with its stream and scan state."""
        rkey = (access.path, access.job)
        reader = self._readers.get(rkey)
        if reader is None:
            reader = self._readers[rkey] = Reader()
        else:
            self._readers.move_to_end(rkey)
        contiguous = reader.advance(access.offset, access.size, access.ts)
        reader.last_tick = self._clock.tick
        if reader.run >= 2:
            if len(self._scanning) >= MAX_JOBS and access.job not in self._scanning:
                self._scanning.clear()
            self._scanning[access.job] = reader.rate
        elif not contiguous and access.offset:
            self._scanning.pop(access.job, None)  # a jump inside an object: not a scanner
        hint = access.hint
        reader.sequential = hint != "random" and (
            reader.run >= 2 or hint == "sequential" or (access.offset == 0 and access.job in self._scanning)
        )
        stream_key, label = self._level(access)
        if label is Pattern.UNKNOWN:
            if reader.run >= 2:
                label = Pattern.SEQUENTIAL
            elif hint in _HINTS:
                label = _HINTS[hint]
        reader.stream = self._stream(stream_key, label)
        reader.stream.read(self._clock)
        return reader

    def _level(self, access: Access) -> tuple[Hashable, Pattern]:
        """The act level's (path, region) and label, cached per object (per directory for one-block objects)."""
        tree = self._tree
        if tree is None:
            return (access.path, None), Pattern.UNKNOWN
        multi = access.object_size > access.block_size
        if multi:
            where = (access.path, access.job, access.offset // getattr(tree, "region_size", _NO_REGION))
        else:
            where = (access.path.rpartition("/")[0], access.job, -1)
        entry = self._levels.get(where)
        tick = self._clock.tick
        deep = access.offset >= access.block_size
        # A multi-block object gets a file node once a read lands past its first block: ask again then.
        if entry is None or entry[2] <= 0 or entry[3] <= tick or (deep and not entry[4]):
            level = tree.act_level(access.path, access.job, access.offset)
            if level.label is Pattern.RANDOM:
                level = self._pooled(tree, access, level)
            if len(self._levels) >= MAX_LEVELS:
                self._levels.clear()
            entry = self._levels[where] = [(level.path, level.region), level.label, LEVEL_USES,
                                           tick + LEVEL_TTL, deep or not multi]
        entry[2] -= 1
        return entry[0], entry[1]

    @staticmethod
    def _pooled(tree, access: Access, level):
        """The highest random ancestor of a random act level, below the root.

        A random parent visits its children in an exchangeable order, so they
        are worth the same: valuing them together avoids churn between
        siblings that differ only by where an epoch happens to be.
        """
        chain = tree.levels(access.path, access.job, access.offset)
        i = next((k for k, lv in enumerate(chain) if lv.path == level.path and lv.region == level.region), None)
        if i is None:
            return level
        while i > 1 and chain[i - 1].label is Pattern.RANDOM:
            i -= 1
        return chain[i]

    def _stream(self, key: Hashable, label: Pattern) -> Stream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = Stream(key, label, self._clock)
        stream.label = label
        return stream

    def _live(self, stream: Stream) -> Stream:
        if stream.dead:
            return self._stream(stream.key, stream.label)
        return stream

    # -- where resident blocks are kept --------------------------------------

    def _used(self, key: Hashable, blk: _Resident, stream: Stream, reader: Reader, pin: bool) -> None:
        """A resident block was read by ``reader`` of ``stream``."""
        if pin and (blk.place == _PROTECTED or self._protectable(blk.size)):
            if blk.place != _PROTECTED:
                self._unplace(key, blk)
                blk.stream = stream
                self._protect(key, blk, reader)
            blk.reader, blk.since = reader, self._clock.tick
            return
        if blk.place == _PROTECTED:
            self._unplace(key, blk)
            self._place(key, blk, stream)
        elif blk.stream is not stream or blk.place != _class_of(stream.label):
            self._unplace(key, blk)
            self._place(key, blk, stream)
        elif blk.place == _UNIFORM:
            stream.blocks.move_to_end(key)
        elif blk.place == _SKEWED:
            self._skew_push(key, blk)
        else:
            self._pool.touch(key)
        if blk.place == _POOL:  # a hit the pool earns, also for a block it has just taken in
            clock = self._clock
            self._pool_hits = clock.now(self._pool_hits, self._pool_hits_epoch) + 1.0
            self._pool_hits_epoch = clock.epoch
            self._pool_hit_tick = clock.tick

    def _place(self, key: Hashable, blk: _Resident, stream: Stream) -> None:
        """Keep an unprotected block with the class its stream's label calls for."""
        stream = blk.stream = self._live(stream)
        place = blk.place = _class_of(stream.label)
        if place == _UNIFORM:
            stream.blocks[key] = None
            stream.resident += blk.size
            if len(stream.blocks) == 1:
                self._uniform_push(stream)
        elif place == _SKEWED:
            stream.skewed += 1
            self._skew_push(key, blk)
        else:
            self._pool.insert(key, blk.size)

    def _unplace(self, key: Hashable, blk: _Resident) -> None:
        place = blk.place
        if place == _PROTECTED:
            del self._protected[key]
            self._protected_bytes -= blk.size
            blk.reader = None
        elif place == _UNIFORM:
            del blk.stream.blocks[key]
            blk.stream.resident -= blk.size
        elif place == _SKEWED:
            del self._skew[key]
            blk.stream.skewed -= 1
        elif place == _POOL:
            self._pool.remove(key)
        blk.place = -1

    def _protectable(self, size: int) -> bool:
        return self._protected_bytes + self._requested_bytes + size <= self._protect_budget

    def _protect(self, key: Hashable, blk: _Resident, reader: Reader | None) -> bool:
        """Protect an unplaced block for ``reader`` if the budget allows; whether it did."""
        if not self._protectable(blk.size):
            return False
        blk.place = _PROTECTED
        blk.reader, blk.since = reader, self._clock.tick
        self._protected[key] = None
        self._protected_bytes += blk.size
        return True

    def _release(self, key: Hashable) -> None:
        """A protected block's reader no longer needs it: keep it by value."""
        blk = self._blocks.get(key)
        if blk is not None and blk.place == _PROTECTED:
            self._unplace(key, blk)
            self._place(key, blk, blk.stream)

    def _unpin(self, reader: Reader) -> None:
        key, reader.current = reader.current, None
        if self._pinned.get(key) is reader:
            del self._pinned[key]
            self._release(key)

    def _uniform_push(self, stream: Stream) -> None:
        stream.heap_seq = seq = next(self._seq)
        heapq.heappush(self._uheap, (stream.value, stream.high, seq, stream))  # equal values: least potential first
        if len(self._uheap) > 2 * len(self._streams) + 64:
            self._uheap = [e for e in self._uheap if e[3].heap_seq == e[2] and e[3].blocks]
            heapq.heapify(self._uheap)

    def _skew_push(self, key: Hashable, blk: _Resident) -> None:
        """(Re)value a block of the skewed class: its visit count per byte, or nothing if its stream is idle."""
        seen = self._history.get(key)
        count, epoch = (seen.count, seen.epoch) if seen is not None else (0.5, self._clock.epoch)
        prio = -math.inf if blk.stream.idle else math.log2(count / blk.size) + epoch
        entry = self._skew[key] = (prio, next(self._seq))
        heapq.heappush(self._sheap, (*entry, key))
        if len(self._sheap) > 2 * len(self._skew) + 64:
            self._sheap = [(p, s, k) for k, (p, s) in self._skew.items()]
            heapq.heapify(self._sheap)

    def _settle_pool(self) -> None:
        """Move the pool's next victims whose streams have been labelled since to their streams' classes.

        A stream's first blocks enter the pool while it has no label; left
        there, they would be valued as the pool (and a stable subset would
        lose them to its own later blocks). They move lazily, oldest first,
        when they are about to be evicted: each block once.
        """
        pool = self._pool
        while len(pool):
            key = pool.peek_victim()
            blk = self._blocks[key]
            stream = self._live(blk.stream)
            if _class_of(stream.label) == _POOL:
                return
            self._unplace(key, blk)
            self._place(key, blk, stream)
            if blk.place == _UNIFORM:
                stream.blocks.move_to_end(key, last=False)  # an old block: least recently used

    def _demote(self, stream: Stream) -> None:
        """An idle stream's frequent blocks are worth nothing now (until read again)."""
        for key in [k for k in self._skew if self._blocks[k].stream is stream]:
            self._skew_push(key, self._blocks[key])

    def _min_class(self) -> tuple[float, int, object] | None:
        """The lowest-valued class with an evictable block: ``(value, place, stream or key)``."""
        self._settle_pool()
        best = None
        uheap = self._uheap
        while uheap:
            value, _, seq, stream = uheap[0]
            if stream.heap_seq == seq and stream.blocks:
                best = (value, _UNIFORM, stream)
                break
            heapq.heappop(uheap)
        sheap, clock = self._sheap, self._clock
        while sheap:
            prio, seq, key = sheap[0]
            entry = self._skew.get(key)
            if entry is not None and entry[1] == seq:
                value = 2.0 ** (prio - clock.epoch) / max(clock.exposure, 1.0)
                if best is None or value <= best[0]:  # ties: a stream's stable subset stays
                    best = (value, _SKEWED, key)
                break
            heapq.heappop(sheap)
        if len(self._pool) and (best is None or self._pool_value <= best[0]):
            best = (self._pool_value, _POOL, None)
        return best

    # -- periodic work -----------------------------------------------------

    def _rebalance(self) -> None:
        """Refresh stream values and forget idle readers, stale protections and requests."""
        clock = self._clock
        tick = clock.tick
        self._next_rebalance = tick + min(max(REBALANCE_EVERY, len(self._streams)), tick)
        for key, stream in list(self._streams.items()):
            if not stream.blocks and stream.footprint <= 0 and tick - stream.last_tick > READER_IDLE:
                stream.dead = True
                del self._streams[key]
                continue
            old, was_idle = (stream.value, stream.high), stream.idle
            stream.estimate(clock, SEQ_DISCOUNT if stream.label is Pattern.SEQUENTIAL else 1.0)
            if (stream.value, stream.high) != old and stream.blocks:
                self._uniform_push(stream)
            if stream.idle and not was_idle and stream.skewed:
                self._demote(stream)
        # The pool holds blocks of streams with no label (or no label yet): it
        # is worth what it earns, its hits per byte, and nothing once it has gone idle.
        hits, exposure = clock.now(self._pool_hits, self._pool_hits_epoch), max(clock.exposure, 1.0)
        idle = silent(hits, exposure, tick - self._pool_hit_tick)
        self._pool_value = 0.0 if idle else hits / exposure / max(self._pool.used, 1)

        readers = self._readers
        while readers:
            reader = next(iter(readers.values()))
            if tick - reader.last_tick <= READER_IDLE:
                break
            readers.popitem(last=False)
            if reader.current is not None:
                self._unpin(reader)
        for key in [k for k in self._protected if self._stale(self._blocks[k], tick)]:
            self._release(key)
        for key in [k for k, r in self._requested.items() if tick - r.tick > STALE]:
            self._requested_bytes -= self._requested.pop(key).size

    @staticmethod
    def _stale(blk: _Resident, tick: int) -> bool:
        reader = blk.reader
        return tick - blk.since > STALE or reader is None or tick - reader.last_tick > READER_IDLE
