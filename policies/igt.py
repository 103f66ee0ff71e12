"""IGT: the pattern-aware policy, driven by the AccessStreamTree.

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

Values are refreshed every few hundred reads (:meth:`IGT._rebalance`). Hits
that clients serve themselves arrive in batches (:meth:`IGT.observe_many`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np

from igtcache.patterns import Pattern
from igtcache.stream_tree import Groups, stable_order

from .arc import ARC
from .base import Access, BlockKey, Insertion, Policy
from .igt_batch import advance_readers, last_true
from .igt_readahead import Reader, Readahead
from .igt_streams import Clock, History, Stream, silent

if TYPE_CHECKING:
    from igtcache.residency import AccessBatch, BatchBlocks

@dataclass(frozen=True)
class IGTParams:
    """Every figure that shapes IGT's decisions, in one place.

    A policy built with other values shows them in its :attr:`IGT.label`
    (``igt(hysteresis=0.2)``), so a table of results says what was measured.
    """

    #: Shortest aging period (ticks); it also grows by this many ticks per resident block.
    min_aging_period: int = 1024
    aging_per_block: int = 8
    #: Values are refreshed at least every this many reads (more with many streams);
    #: early on after 16, 32, 64 ... reads, so a short run is not valued at zero.
    rebalance_every: int = 64
    first_rebalance: int = 16
    #: History size: at least this many blocks, and this many per block of capacity.
    history_min: int = 65_536
    history_per_block: int = 4
    #: A block displaces another only if worth this much more (no churn on noise).
    hysteresis: float = 0.1
    #: Weight of reuse that readahead would serve anyway (sequential streams, a whole object's rest).
    seq_discount: float = 0.25
    #: Share of capacity that protected (prefetched or in-use) blocks may hold.
    protect_share: float = 0.25
    #: Readahead cap in blocks, and as a share of capacity per reader.
    max_depth: int = 64
    reader_share: int = 8
    #: A reader idle this many ticks is forgotten and its protected blocks released.
    reader_idle: int = 8192
    #: A protected block is released after this many ticks whatever happens.
    stale: int = 65_536
    #: The tree's act level is asked again after this many uses or ticks.
    level_uses: int = 16
    level_ttl: int = 4096

    def changed(self) -> dict[str, object]:
        """The fields that differ from the defaults, in declaration order."""
        default = IGTParams()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


#: Bounds on what IGT remembers (memory, not tuning): act-level cache entries, scanning jobs.
MAX_LEVELS = 65_536
MAX_JOBS = 4096

_PROTECTED, _UNIFORM, _SKEWED, _POOL = range(4)
_NO_REGION = 1 << 62
_HINTS = {p.value: p for p in Pattern}
_LABELS = list(Pattern)  # a label's code in the batch path is its index here
_CODES = {label: code for code, label in enumerate(_LABELS)}


class _Resident:
    """A resident block: owner stream, size, where it is kept, and who protects it.

    ``ahead``: readahead brings it back in time when it is gone (it was
    requested ahead, or last read by a scan past its object's first block).
    """

    __slots__ = ("stream", "size", "place", "reader", "since", "ahead")

    def __init__(self, stream: Stream, size: int, ahead: bool = False) -> None:
        self.stream = stream
        self.size = size
        self.place = -1
        self.reader: Reader | None = None
        self.since = 0
        self.ahead = ahead


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

    ``readahead=False`` turns prefetching off (residency decisions only);
    ``params`` tunes it (:class:`IGTParams`).
    """

    name = "igt"

    def __init__(self, capacity: int, *, readahead: bool = True, params: IGTParams = IGTParams()) -> None:
        super().__init__(capacity)
        self.readahead = readahead
        self.params = params
        self._clock = Clock(self.params.min_aging_period)
        self._tree = None
        self._history = History(self.params.history_min)
        self._streams: dict[Hashable, Stream] = {}
        self._readers: OrderedDict[tuple[str, Hashable], Reader] = OrderedDict()  # least recently used first
        # (path, or directory of a one-block object; job; region) -> [stream key, label, uses left, expiry, deep]
        self._levels: dict[tuple, list] = {}
        self._scanning: dict[Hashable, float | None] = {}  # job reading objects front to back -> its rate
        self._blocks: dict[Hashable, _Resident] = {}
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        self._protected_bytes = 0
        self._protect_budget = int(capacity * self.params.protect_share)
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
        self._readahead = Readahead(self.params.max_depth)
        self._next_rebalance = self.params.first_rebalance
        self._orphans = Stream(None, Pattern.UNKNOWN, self._clock)
        self._block_size = 0

    @property
    def label(self) -> str:
        changed = self.params.changed()
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")

    # -- the engine's calls ------------------------------------------------

    def bind_streams(self, streams) -> None:
        self._tree = streams

    def observe(self, access: Access) -> None:
        clock = self._clock
        clock.advance(max(self.params.min_aging_period, self.params.aging_per_block * len(self._blocks)))
        if clock.tick >= self._next_rebalance:
            self._rebalance()
        bs = access.block_size
        self._use_block_size(bs)
        reader = self._reader(access)
        stream = self._stream_of(access, reader)
        if reader is None:  # a whole read of an object without a reader: no scan, no partial block
            self._visit_blocks(access, stream)
            return
        end = min(access.offset + access.size, access.object_size)
        partial = None
        if reader.sequential and end < access.object_size and end % bs:
            partial = BlockKey(access.path, access.version, access.last_block)
        if reader.current is not None and reader.current != partial:
            self._unpin(reader)
        self._visit_blocks(access, stream, reader, partial)
        if access.last_block >= access.first_block:
            reader.last_block = access.last_block
        reader.end = end
        if partial is not None:
            reader.current = partial
            self._pinned[partial] = reader

    def _visit_blocks(self, access: Access, stream: Stream, reader: Reader | None = None,
                      partial: BlockKey | None = None) -> None:
        """The history visits and resident-block uses of one read."""
        clock, bs = self._clock, access.block_size
        history, blocks = self._history, self._blocks
        for index in access.blocks:
            key = BlockKey(access.path, access.version, index)
            seen = history.visit(key, stream, min(bs, access.object_size - index * bs), clock)
            if seen is None:
                reuse = False
            elif reader is not None and index == reader.last_block and reader.run >= 2:
                reuse = reader.reuse_visit  # a scan still in its block: the same visit
            else:
                reuse = True
                seen.visited(clock)
            if reuse:
                stream.reused(clock)
            if reader is not None:
                reader.reuse_visit = reuse
            blk = blocks.get(key)
            if blk is not None:
                self._used(key, blk, stream, reader, key == partial)
            else:
                request = self._requested.get(key)
                if request is not None:
                    request.read = True

    def observe_many(self, batch: AccessBatch, blocks: BatchBlocks) -> None:
        """:meth:`observe` for a batch of reads (hits that clients report), grouped
        per reader, stream and block, so that a read costs a few array steps.

        Read by read would differ in this: the tree's labels are those after
        the batch; stream values are refreshed at most once per aging epoch
        the batch spans; a block is placed as its last read in the batch
        says, and only each reader's last partial block is pinned.
        """
        self._use_block_size(blocks.block_size)
        clock, start = self._clock, 0
        while start < len(batch):
            clock.advance(max(self.params.min_aging_period, self.params.aging_per_block * len(self._blocks)))
            if clock.tick >= self._next_rebalance:
                self._rebalance()
            stop = start + 1 + clock.advance_in_epoch(len(batch) - start - 1)
            self._observe_chunk(batch, blocks, start, stop)
            start = stop

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
        return low > self._high(best) * (1.0 + self.params.hysteresis)

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
        cap = max(1, self.capacity // (self.params.reader_share * bs))
        rate = reader.rate if reader.rate is not None else self._scanning.get(access.job)
        first, depth = self._readahead.window(rate, bs, access.last_block - access.first_block + 1, cap)
        if access.offset == 0 and last - access.last_block <= depth:
            # A load from an object's first piece that the window reaches the end of (a whole
            # adapter): all of the rest, from the next block, since a block cached on arrival
            # lands sooner as readahead than as the demand fetch its read would start.
            first = 1
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

    def _victim(self, incoming: Insertion) -> Hashable:
        best = self._min_class()
        if best is None:
            return next(iter(self._protected))
        _, place, holder = best
        if place == _UNIFORM:
            return next(reversed(holder.blocks))  # most recently used: needed last by a loop or an epoch
        if place == _SKEWED:
            return holder
        return self._pool._victim(Insertion(incoming.key, incoming.size, incoming.prefetched))  # no ARC ghost

    def _arriving(self, key: Hashable, size: int, prefetched: bool) -> Insertion:
        """Where the block is to be kept: ``origin`` is ``(block, protecting reader, unread)``."""
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
        return Insertion(key, size, prefetched, (_Resident(stream, size, ahead=request is not None), guard, unread))

    def insert(self, key: Hashable, size: int, *, prefetched: bool = False) -> list[Hashable]:
        if key in self._sizes:
            self.remove(key)
        incoming = self._arriving(key, size, prefetched)
        blk, _, unread = incoming.origin
        if not unread and _class_of(blk.stream.label) == _POOL and self._pool.used == self.used:
            # ARC holds every resident block: it makes room itself, exactly as ARC alone would.
            evicted = self._pool.insert(key, size)
            for victim in evicted:
                self.remove(victim)
            self._sizes[key] = size
            self.used += size
            blk.place = _POOL
            self._blocks[key] = blk
            return evicted
        return self._insert(incoming)

    def _on_insert(self, incoming: Insertion) -> None:
        key, (blk, guard, unread) = incoming.key, incoming.origin
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

    # -- batches -------------------------------------------------------------

    def _observe_chunk(self, batch: AccessBatch, blocks: BatchBlocks, start: int, stop: int) -> None:
        """Reads ``start:stop`` of a batch, all in the clock's epoch, the last at its tick."""
        n, objects = stop - start, batch.objects
        obj, job, offset = batch.obj[start:stop], batch.job[start:stop], batch.offset[start:stop]
        first, last, end = blocks.first[start:stop], blocks.last[start:stop], blocks.end[start:stop]
        ticks = self._clock.tick - (n - 1) + np.arange(n)

        # Readers, one per (path, job): an object's versions and hints share one.
        paths: dict[str, int] = {}
        path_of = np.array([paths.setdefault(o.path, len(paths)) for o in objects], dtype=np.intp)
        by_reader = Groups(path_of[obj] * len(batch.jobs) + job)
        order, group, heads = by_reader.order, by_reader.of, by_reader.firsts
        rkeys = [(objects[o].path, batch.jobs[j]) for o, j in zip(obj[heads].tolist(), job[heads].tolist())]
        whole = (offset == 0) & (end == blocks.object_size[start:stop])
        readers = self._readers_of(rkeys, np.logical_and.reduceat(whole[order], by_reader.starts).tolist())
        steps = advance_readers(readers, by_reader.starts, offset[order], batch.size[start:stop][order],
                                batch.ts[start:stop][order], end[order], first[order], last[order])
        run, contiguous, rate, continues = (by_reader.unsort(a) for a in steps)
        tails = by_reader.lasts.tolist()  # each reader's last read
        scanning = self._scan_many(batch.jobs, job, run, contiguous, rate, offset)
        hints = [objects[o].hint for o in obj[heads].tolist()]
        runs, offsets = run.tolist(), offset.tolist()
        sequential = [hint != "random" and (runs[t] >= 2 or hint == "sequential"
                                            or (offsets[t] == 0 and scanning[t]))
                      for hint, t in zip(hints, tails)]
        multi = blocks.object_size[start:stop] > blocks.block_size
        streams, stream, label = self._streams_many(rkeys, hints, by_reader, offset, multi, run, ticks)

        # Blocks: every (read, block) pair of the chunk, and the distinct blocks in it.
        p0, p1 = np.searchsorted(blocks.pair_read, (start, stop)).tolist()
        pair_read, pair_key = blocks.pair_read[p0:p1] - start, blocks.pair_key[p0:p1]
        partials = self._partials(readers, objects, obj, tails, sequential, end, last, blocks.block_size)
        if len(pair_read):
            self._visit_many(blocks, pair_read, pair_key, group, stream, label, ticks, continues, streams,
                             readers, partials)
        self._finish_readers(rkeys, readers, tails, sequential, streams, stream, ticks, partials)

    def _visit_many(self, blocks: BatchBlocks, pair_read: np.ndarray, pair_key: np.ndarray,
                    group: np.ndarray, stream: np.ndarray, label: np.ndarray, ticks: np.ndarray,
                    continues: np.ndarray, streams: list[Stream], readers: list[Reader | None],
                    partials: list[BlockKey | None]) -> None:
        """The history visits and resident-block uses of a chunk's (read, block) pairs:
        each distinct block once, in the order of last use, as its last read says."""
        pairs, clock = len(pair_key), self._clock
        by_key = Groups(pair_key)
        by_last = stable_order(by_key.lasts)  # the distinct blocks, numbered in the order of last use
        rank = np.empty_like(by_last)
        rank[by_last] = np.arange(len(by_last))
        uniq, key_first, key_of = by_key.ids[by_last], by_key.firsts[by_last], rank[by_key.of]
        key_reads = (by_key.ends - by_key.starts)[by_last]
        last_read = pair_read[by_key.lasts[by_last]]
        keys = [blocks.keys[k] for k in uniq.tolist()]
        entries = self._history.entries(keys)
        seen = np.ones(pairs, dtype=bool)  # seen before: in the history, or earlier in the chunk
        seen[key_first] = [e is not None for e in entries]
        cont = np.zeros(pairs, dtype=bool)  # a read's first pair, in the block its reader is still in
        cont[np.flatnonzero(np.diff(pair_read, prepend=-1))] = True
        cont &= continues[pair_read]
        reuse = self._reuse_many(readers, group[pair_read], cont, seen)
        reused = np.bincount(stream[pair_read], weights=reuse, minlength=len(streams)).astype(np.int64)
        for s, count in zip(streams, reused.tolist()):
            if count:
                s.reused(clock, count)
        revisits = np.bincount(key_of, weights=~cont & seen, minlength=len(keys)).astype(np.int64)
        owners = [streams[s] for s in stream[last_read].tolist()]
        self._history.visit_many(keys, entries, owners, blocks.length[uniq].tolist(), revisits.tolist(), clock)
        self._use_many(keys, owners, label[last_read].tolist(), group[last_read].tolist(),
                       key_reads.tolist(), ticks[last_read].tolist(), readers, partials, streams)

    def _readers_of(self, rkeys: list[tuple[str, Hashable]], whole: list[bool]) -> list[Reader | None]:
        """The reader of each (path, job), created as needed; ``None`` where there is
        none and every read is whole (see :meth:`_reader`)."""
        readers = []
        for rkey, all_whole in zip(rkeys, whole):
            reader = self._readers.get(rkey)
            if reader is None and not all_whole:
                reader = self._readers[rkey] = Reader()
            readers.append(reader)
        return readers

    def _scan_many(self, jobs: Sequence[Hashable], job: np.ndarray, run: np.ndarray, contiguous: np.ndarray,
                   rate: np.ndarray, offset: np.ndarray) -> list[bool]:
        """``_scanning`` through a chunk: per read, whether its job counts as a scanner after it."""
        begins = run >= 2
        events = begins | (~contiguous & (offset != 0))  # a scan goes on, or a jump inside an object
        by_job = Groups(job)
        order, starts, lengths = by_job.order, by_job.starts, by_job.ends - by_job.starts
        event = last_true(events[order], np.repeat(starts, lengths))
        was = np.repeat([jobs[j] in self._scanning for j in by_job.ids.tolist()], lengths)
        after = by_job.unsort(np.where(event >= 0, begins[order][event], was))
        for j, e in zip(by_job.ids.tolist(), event[by_job.ends - 1].tolist()):
            if e < 0:
                continue
            e = int(order[e])
            if begins[e]:
                if len(self._scanning) >= MAX_JOBS and jobs[j] not in self._scanning:
                    self._scanning.clear()
                self._scanning[jobs[j]] = None if np.isnan(rate[e]) else float(rate[e])
            else:
                self._scanning.pop(jobs[j], None)
        return after.tolist()

    def _streams_many(self, rkeys: list[tuple[str, Hashable]], hints: list[str | None], readers: Groups,
                      offset: np.ndarray, multi: np.ndarray, run: np.ndarray, ticks: np.ndarray
                      ) -> tuple[list[Stream], np.ndarray, np.ndarray]:
        """The streams of a chunk's reads, each of them read: the streams, and per
        read the index of its stream and the code of its label."""
        # A read's act level cache entry: (path, or directory of a one-block object; job; region).
        group = readers.of
        region = np.where(multi, offset // getattr(self._tree, "region_size", _NO_REGION), -1)
        bases: dict[tuple, int] = {}
        base = np.array([bases.setdefault((path if m else path.rpartition("/")[0], job), len(bases))
                         for (path, job), m in zip(rkeys, multi[readers.firsts].tolist())])
        entries = Groups(base[group] * (int(region.max()) + 2) + region + 1)
        entry_of, last = entries.of, entries.lasts.tolist()
        deep = (np.bincount(entry_of, weights=offset >= self._block_size, minlength=len(entries)) > 0).tolist()
        entry_reads = (entries.ends - entries.starts).tolist()
        keys: dict[Hashable, int] = {}
        entry_stream = np.empty(len(entries), dtype=np.intp)
        entry_label = np.empty(len(entries), dtype=np.intp)
        for e, (t, reads) in enumerate(zip(last, entry_reads)):
            path, job = rkeys[group[t]]
            key, found = self._level_of(path, job, int(offset[t]), bool(multi[t]), deep[e], reads)
            entry_stream[e] = keys.setdefault(key, len(keys))
            entry_label[e] = _CODES[found]
        stream, label = entry_stream[entry_of], entry_label[entry_of]
        hint = np.array([_CODES[_HINTS.get(h, Pattern.UNKNOWN)] for h in hints])[group]
        label = np.where(label != _CODES[Pattern.UNKNOWN], label,
                         np.where(run >= 2, _CODES[Pattern.SEQUENTIAL], hint))
        streams = []
        by_stream = Groups(stream)
        for key, t, reads in zip(keys, by_stream.lasts.tolist(), (by_stream.ends - by_stream.starts).tolist()):
            streams.append(self._stream(key, _LABELS[label[t]]))
            streams[-1].read(self._clock, reads, int(ticks[t]))
        return streams, stream, label

    def _reuse_many(self, readers: list[Reader | None], reader_of: np.ndarray, cont: np.ndarray,
                    seen: np.ndarray) -> np.ndarray:
        """Per (read, block) pair, whether it is a reuse: a block seen before, unless it
        continues its reader's visit, which keeps that visit's answer. Leaves each
        reader's ``reuse_visit`` as after its last pair."""
        by_reader = Groups(reader_of)
        order, starts, ends = by_reader.order, by_reader.starts, by_reader.ends
        origin = last_true(~cont[order], np.repeat(starts, ends - starts))
        carried = np.array([r is not None and r.reuse_visit for r in readers], dtype=bool)[reader_of[order]]
        ordered = np.where(origin >= 0, seen[order][origin], carried)
        for g, value in zip(by_reader.ids.tolist(), ordered[ends - 1].tolist()):
            if readers[g] is not None:
                readers[g].reuse_visit = value
        return by_reader.unsort(ordered)

    def _partials(self, readers: list[Reader | None], objects, obj: np.ndarray, tails: list[int],
                  sequential: list[bool], end: np.ndarray, last: np.ndarray, bs: int) -> list[BlockKey | None]:
        """Each reader's partial block after its last read (to pin), unpinning the one it leaves."""
        partials = []
        for reader, t, seq in zip(readers, tails, sequential):
            partial = None
            if reader is not None:
                o, stop = objects[obj[t]], int(end[t])
                if seq and stop < o.size and stop % bs:
                    partial = BlockKey(o.path, o.version, int(last[t]))
                if reader.current is not None and reader.current != partial:
                    self._unpin(reader)
            partials.append(partial)
        return partials

    def _use_many(self, keys: list[BlockKey], owners: list[Stream], labels: list[int], groups: list[int],
                  reads: list[int], ticks: list[int], readers: list[Reader | None],
                  partials: list[BlockKey | None], streams: list[Stream]) -> None:
        """:meth:`_used` once per block, in the order of last use, each with the stream,
        label and reader of its last read; marks requested blocks as read."""
        for request in filter(None, map(self._requested.get, keys)):
            request.read = True
        labelled = [stream.label for stream in streams]  # each stream's last read's label
        pool_reads, pool_tick = 0, None
        found = list(map(self._blocks.get, keys))
        used = itertools.compress(zip(keys, found, owners, labels, groups, reads, ticks), found)
        for key, blk, stream, label, g, n, tick in used:
            stream.label = _LABELS[label]
            self._used(key, blk, stream, readers[g], key == partials[g])
            if blk.place == _POOL:  # _used() counted one read as the pool's hit; the others too
                pool_reads += n - 1
                pool_tick = tick
        for stream, label in zip(streams, labelled):
            stream.label = label
        if pool_tick is not None:
            clock = self._clock
            self._pool_hits = clock.now(self._pool_hits, self._pool_hits_epoch) + pool_reads
            self._pool_hits_epoch = clock.epoch
            self._pool_hit_tick = pool_tick

    def _finish_readers(self, rkeys: list[tuple[str, Hashable]], readers: list[Reader | None],
                        tails: list[int], sequential: list[bool], streams: list[Stream], stream: np.ndarray,
                        ticks: np.ndarray, partials: list[BlockKey | None]) -> None:
        """Leave each kept reader as after its last read, and most recently used last."""
        for g in sorted(range(len(readers)), key=tails.__getitem__):
            reader = readers[g]
            if reader is None:
                continue
            t = tails[g]
            reader.last_tick = int(ticks[t])
            reader.sequential = sequential[g]
            reader.stream = streams[stream[t]]
            if partials[g] is not None:
                reader.current = partials[g]
                self._pinned[partials[g]] = reader
            self._readers.move_to_end(rkeys[g])

    def _use_block_size(self, bs: int) -> None:
        if bs != self._block_size:
            self._block_size = bs
            params = self.params
            self._history.max_blocks = max(params.history_min, params.history_per_block * self.capacity // bs)

    # -- readers and streams -----------------------------------------------

    def _reader(self, access: Access) -> Reader | None:
        """The reader of ``access``, advanced past it, with its scan state.

        ``None`` for a whole read of an object that has no reader: one would
        change nothing (the read starts a run at offset 0 and leaves no
        partial block), so a dataset of small files read whole keeps none.
        """
        rkey = (access.path, access.job)
        reader = self._readers.get(rkey)
        if reader is None:
            if access.offset == 0 and access.size >= access.object_size:
                return None
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
        return reader

    def _stream_of(self, access: Access, reader: Reader | None) -> Stream:
        """The stream ``access`` belongs to, with one more read; it becomes ``reader``'s."""
        stream_key, label = self._level(access)
        if label is Pattern.UNKNOWN:
            if reader is not None and reader.run >= 2:
                label = Pattern.SEQUENTIAL
            elif access.hint in _HINTS:
                label = _HINTS[access.hint]
        stream = self._stream(stream_key, label)
        stream.read(self._clock)
        if reader is not None:
            reader.stream = stream
        return stream

    def _level(self, access: Access) -> tuple[Hashable, Pattern]:
        """The act level's (path, region) and label, cached per object (per directory for one-block objects)."""
        return self._level_of(access.path, access.job, access.offset, access.object_size > access.block_size,
                              access.offset >= access.block_size)

    def _level_of(self, path: str, job: Hashable, offset: int, multi: bool, deep: bool,
                  uses: int = 1) -> tuple[Hashable, Pattern]:
        """:meth:`_level` for ``uses`` reads at one entry; ``deep``: one lies past its object's first block."""
        tree = self._tree
        if tree is None:
            return (path, None), Pattern.UNKNOWN
        if multi:
            where = (path, job, offset // getattr(tree, "region_size", _NO_REGION))
        else:
            where = (path.rpartition("/")[0], job, -1)
        entry = self._levels.get(where)
        tick = self._clock.tick
        # A multi-block object gets a file node once a read lands past its first block: ask again then.
        if entry is None or entry[2] <= 0 or entry[3] <= tick or (deep and not entry[4]):
            level = tree.act_level(path, job, offset)
            if multi and level.label is not Pattern.SKEWED and job in self._scanning:
                # A job that loads whole objects from a skewed directory (adapters): each object is
                # a unit, worth its loads. Valued in the directory's skewed stream, every block of
                # an object counts one visit per load, as a table block counts one per lookup.
                level = tree.skewed_ancestor(path, job) or level
            if level.label is Pattern.RANDOM:
                # Random siblings are pooled up to the highest random ancestor below the root: a
                # random parent visits its children in an exchangeable order, so they are worth
                # the same, and valued apart they churn only by where an epoch happens to be.
                level = tree.climb(level, job, Pattern.RANDOM)
            if len(self._levels) >= MAX_LEVELS:
                self._levels.clear()
            entry = self._levels[where] = [(level.path, level.region), level.label, self.params.level_uses,
                                           tick + self.params.level_ttl, deep or not multi]
        entry[2] -= uses
        return entry[0], entry[1]

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
        blk.ahead = reader is not None and reader.sequential and key.index > 0
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
        """(Re)value a block of the skewed class: its visit count per byte, or nothing if its stream is idle.

        Each visit a resident block serves saves a wait on the remote, unless readahead
        would have brought the block in time anyway (``ahead``: a whole object's later
        blocks); holding those saves only their transfer, so they count as sequential
        streams do. A hot object thus keeps its first block before its rest.
        """
        seen = self._history.get(key)
        count, epoch = (seen.count, seen.epoch) if seen is not None else (0.5, self._clock.epoch)
        weight = self.params.seq_discount if blk.ahead else 1.0
        prio = -math.inf if blk.stream.idle else math.log2(count * weight / blk.size) + epoch
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
        self._next_rebalance = tick + min(max(self.params.rebalance_every, len(self._streams)), tick)
        for key, stream in list(self._streams.items()):
            if not stream.blocks and stream.footprint <= 0 and tick - stream.last_tick > self.params.reader_idle:
                stream.dead = True
                del self._streams[key]
                continue
            old, was_idle = (stream.value, stream.high), stream.idle
            stream.estimate(clock, self.params.seq_discount if stream.label is Pattern.SEQUENTIAL else 1.0)
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
            if tick - reader.last_tick <= self.params.reader_idle:
                break
            readers.popitem(last=False)
            if reader.current is not None:
                self._unpin(reader)
        for key in [k for k in self._protected if self._stale(self._blocks[k], tick)]:
            self._release(key)
        for key in [k for k, r in self._requested.items() if tick - r.tick > self.params.stale]:
            self._requested_bytes -= self._requested.pop(key).size

    def _stale(self, blk: _Resident, tick: int) -> bool:
        reader, params = blk.reader, self.params
        return tick - blk.since > params.stale or reader is None or tick - reader.last_tick > params.reader_idle
