"""The AccessStreamTree: every access the cache sees, as streams at every level.

Nodes follow the path: the root, directories (``/``-separated prefixes),
files, and inside a file that reaches past ``region_size`` its byte regions,
so several workers reading one big file at different places make separate
streams. Each node keeps one *stream* per job (at most ``max_jobs``, the
least recently used dropped first), and each stream a ring of its last
``window`` *visits* plus counters:

* a file or region visit is a block number (``offset // block_size``); a
  read of the block the previous read was in is not a new visit;
* a directory visit is one of its children, ranked by name (plain string
  order, as ``sorted(os.listdir())`` lists a directory) when classified, so
  a name-order scan counts as sequential and a shuffled one as random.
  Reads that continue a child already among the ``DIR_RECENT`` last visits
  (several files open at once) are not new visits; a read at offset 0 of a
  file (a fresh pass) is.

A stream is re-classified (:func:`igtcache.patterns.analyze`) when its visit
count reaches 8, 16, 32, ... up to ``window``, then every ``window // 2``
visits, over the ring only -- never the whole history -- so ``record`` is
amortized O(1) and a label follows a change within about ``window`` visits.
:meth:`AccessStreamTree.record_many` takes a batch of reads (hits that
clients report) with array operations per stream rather than per read, and
classifies a stream at most once per batch.

Nodes are kept in least-recently-touched order and the coldest are pruned
while the tree holds more than ``max_nodes`` (the root aside). A record
touches a region, then its file, then the directories up, so a node is
always warmer than its children and pruning removes childless nodes only.
Memory is bounded by ``max_nodes * max_jobs`` streams of at most ``window``
visits each. Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections import OrderedDict, deque
from typing import Hashable, NamedTuple, Sequence

import numpy as np

from igtcache.patterns import MIN_VISITS, Pattern, Verdict, analyze

#: A child among a directory stream's last this-many visits is still "open".
DIR_RECENT = 8

_ROOT, _DIR, _FILE, _REGION = "root", "dir", "file", "region"
_UNSEEN = Verdict(Pattern.UNKNOWN, 0)


def stable_order(ids: np.ndarray) -> np.ndarray:
    """``np.argsort(ids, kind="stable")`` for non-negative ids, fast for a batch's.

    NumPy sorts 16-bit keys stably by radix sort, ten times faster than
    int64 ones; larger ids get their position appended, which makes any
    sort stable.
    """
    n = len(ids)
    if not n or int(ids.max()) < 1 << 16:
        return np.argsort(ids.astype(np.uint16), kind="stable")
    return np.sort(ids * n + np.arange(n)) % n


class Groups:
    """Positions ``0..n-1`` grouped by ``ids``: ``order`` lists them by id, stably, and
    group ``g`` (of id ``ids[g]``, ascending) is ``order[starts[g]:ends[g]]``;
    ``of`` is each position's group."""

    __slots__ = ("order", "starts", "ends", "ids", "of")

    def __init__(self, ids: np.ndarray) -> None:
        n = len(ids)
        self.order = stable_order(ids)
        ordered = ids[self.order]
        self.starts = np.flatnonzero(np.concatenate(([n > 0], ordered[1:] != ordered[:-1])))
        self.ends = np.append(self.starts[1:], n)[:len(self.starts)]
        self.ids = ordered[self.starts]
        self.of = self.unsort(np.repeat(np.arange(len(self.starts)), self.ends - self.starts))

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def firsts(self) -> np.ndarray:
        """Each group's first position."""
        return self.order[self.starts]

    @property
    def lasts(self) -> np.ndarray:
        """Each group's last position."""
        return self.order[self.ends - 1]

    def unsort(self, values: np.ndarray) -> np.ndarray:
        """``values`` given in ``order``, put back by position."""
        out = np.empty_like(values)
        out[self.order] = values
        return out


class Level(NamedTuple):
    """One level of the tree as seen by a policy: node path, kind and label.

    ``level`` is ``"root"``, ``"dir"``, ``"file"`` or ``"region"``; ``region``
    is the region index for a region, else ``None``.
    """

    path: str
    level: str
    region: int | None
    label: Pattern


class _Stream:
    """One job's visits to one node: a ring of the last visits, counters, label."""

    __slots__ = (
        "items", "pos", "last", "recent", "visits", "accesses", "nbytes", "last_ts",
        "mark_ts", "mark_accesses", "mark_bytes", "rate", "byte_rate",
        "next_eval", "verdict", "changed_ts", "changed_at",
    )

    def __init__(self, directory: bool, size: int, ts: float) -> None:
        self.items: array | list = [] if directory else array("q")
        self.recent: deque | None = deque(maxlen=DIR_RECENT) if directory else None
        self.pos = 0
        self.last: Hashable = None
        self.visits = 0
        self.accesses = 0
        self.nbytes = 0
        self.last_ts = ts
        self.mark_ts, self.mark_accesses, self.mark_bytes = ts, 1, size
        self.rate = self.byte_rate = 0.0
        self.next_eval = MIN_VISITS
        self.verdict = _UNSEEN
        self.changed_ts = ts
        self.changed_at = 0

    def ordered(self) -> list | np.ndarray:
        """The ring's visits, oldest first."""
        items, pos = self.items, self.pos
        if isinstance(items, list):
            return items[pos:] + items[:pos]
        x = np.frombuffer(items, dtype=np.int64)
        return np.concatenate((x[pos:], x[:pos])) if pos else x


class _Node:
    """A directory, file or region: children by name (regions by index) and streams by job."""

    __slots__ = ("name", "path", "key", "kind", "parent", "depth", "children", "streams")

    def __init__(self, name: str | int, path: str, kind: str, parent: _Node | None) -> None:
        self.name = name
        self.path = path
        self.kind = kind
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.key: Hashable = (path, name) if kind is _REGION else path
        self.children: dict | None = {} if kind in (_DIR, _ROOT) else None
        self.streams: dict[Hashable, _Stream] = {}


class AccessStreamTree:
    """Per-path, per-job access streams and their pattern labels.

    ``block_size`` turns offsets into block numbers, ``region_size`` splits
    big files into regions, ``max_nodes`` bounds the nodes (root excluded),
    ``window`` the visits kept per stream and ``max_jobs`` the streams per
    node; ``alpha`` is the significance level of the classifier's tests.
    """

    def __init__(
        self,
        *,
        block_size: int = 4 << 20,
        region_size: int = 256 << 20,
        max_nodes: int = 65_536,
        window: int = 256,
        max_jobs: int = 4,
        alpha: float = 0.01,
    ) -> None:
        if block_size <= 0 or region_size < block_size:
            raise ValueError("need 0 < block_size <= region_size")
        if max_nodes < 1 or window < 2 * MIN_VISITS or max_jobs < 1:
            raise ValueError(f"need max_nodes >= 1, window >= {2 * MIN_VISITS}, max_jobs >= 1")
        self.block_size = block_size
        self.region_size = region_size
        self.max_nodes = max_nodes
        self.window = window
        self.max_jobs = max_jobs
        self.alpha = alpha
        self._period = max(1, window // 2)
        self._root = _Node("", "", _ROOT, None)
        self._nodes: OrderedDict[Hashable, _Node] = OrderedDict()  # coldest first

    def __len__(self) -> int:
        """Nodes in the tree, root excluded."""
        return len(self._nodes)

    def __contains__(self, path: str) -> bool:
        """Whether the tree holds a node for ``path`` (a one-block file has none)."""
        return self._node(path) is not None

    # -- recording ---------------------------------------------------------

    def record(self, path: str, offset: int, size: int, job: Hashable = None,
               ts: float | None = None) -> None:
        """Account one read of ``size`` bytes at ``offset`` of ``path`` by ``job``.

        A file gets a node of its own once a read lands past its first block:
        until then it cannot make a stream, and only its directories hear of
        it -- so a dataset of small files costs directory nodes only.
        """
        if ts is None:
            ts = time.monotonic()
        nodes = self._nodes
        node = nodes.get(path)
        if node is not None and node.kind is _FILE:
            key, parent = node.name, node.parent
            self._visit_file(node, job, offset, size, ts)
        else:
            parent, name = self._parent(path)
            if parent is None:
                return
            node = parent.children.get(name)
            key = name
            if node is not None or offset >= self.block_size:
                node = self._child(parent, name, _FILE)
                if node is None:
                    return
                self._visit_file(node, job, offset, size, ts)
        # Directories up to the root: a visit is a child not open just now.
        restart = offset == 0
        while parent is not None:
            stream = parent.streams.get(job)
            if stream is None:
                stream = self._new_stream(parent, job, size, ts)
            stream.accesses += 1
            stream.nbytes += size
            stream.last_ts = ts
            if key != stream.last and (restart or key not in stream.recent):
                stream.last = key
                stream.recent.append(key)
                self._push(stream, key, True)
            if parent.kind is _DIR:
                nodes.move_to_end(parent.path)
            restart = False
            key, parent = parent.name, parent.parent
        if len(nodes) > self.max_nodes:
            self._prune()

    def record_many(self, paths: Sequence[str], jobs: Sequence[Hashable], obj: np.ndarray, job: np.ndarray,
                    offset: np.ndarray, size: np.ndarray, ts: np.ndarray) -> None:
        """Account reads in order: read ``i`` is ``size[i]`` bytes at ``offset[i]`` of
        ``paths[obj[i]]``, by ``jobs[job[i]]`` at time ``ts[i]``.

        What :meth:`record` does read by read, grouped by stream: a stream is
        classified at most once per call (over its ring after its last read),
        and the nodes' recency order and pruning are brought up to date at
        the end.
        """
        n = len(obj)
        if not n:
            return
        stamps = ts.tolist()
        reads = np.arange(n)
        deep = np.full(len(paths), n)  # an object's first read past its first block
        np.minimum.at(deep, obj[offset >= self.block_size], reads[offset >= self.block_size])
        far = np.full(len(paths), n)  # and past its first region
        np.minimum.at(far, obj[offset >= self.region_size], reads[offset >= self.region_size])
        parent_of = np.full(len(paths), -1)  # an object's directory in `parents`; -1: not recorded
        name_of = np.zeros(len(paths), dtype=np.int64)  # its name in `names`
        leaf_of = np.full(len(paths), -1)  # its file node in `leaves`
        parents: dict[_Node, int] = {}
        names: dict[str, int] = {}
        leaves: dict[_Node, int] = {}
        deeps, fars = deep.tolist(), far.tolist()
        for o in np.flatnonzero(np.bincount(obj, minlength=len(paths))).tolist():
            found = self._file_of(paths[o], deeps[o], n)
            if found is None:
                continue
            parent, name, leaf, since = found
            parent_of[o] = parents.setdefault(parent, len(parents))
            name_of[o] = names.setdefault(name, len(names))
            if leaf is not None:
                leaf_of[o] = leaves.setdefault(leaf, len(leaves))
                deep[o] = since
                far[o] = 0 if leaf.children is not None else fars[o]
        touched: dict[_Node, tuple[int, int]] = {}  # node -> (its last read, -depth): the recency order
        if leaves:
            self._visit_files_many(list(leaves), leaf_of[obj], deep[obj], far[obj], jobs, job, offset, size,
                                   stamps, touched)
        if parents:
            self._visit_dirs_many(list(parents), parent_of[obj], name_of[obj], names, jobs, job, offset, size,
                                  stamps, touched)
        nodes = self._nodes
        for node in sorted(touched, key=touched.__getitem__):
            if nodes.get(node.key) is node:
                nodes.move_to_end(node.key)
        if len(nodes) > self.max_nodes:
            self._prune()

    def _file_of(self, path: str, deep: int, none: int) -> tuple[_Node, str, _Node | None, int] | None:
        """Where reads of ``path`` land, given ``deep``, its first read past the first
        block (``none``: no such read): its directory, its name, its file node
        (created by that read) and the first read that visits it (``none``: no
        file node).

        ``None`` when they are not recorded (an empty path, or a directory).
        """
        node = self._nodes.get(path)
        if node is not None and node.kind is _FILE:
            return node.parent, node.name, node, 0
        parent, name = self._parent(path)
        if parent is None:
            return None
        node = parent.children.get(name)
        if node is not None:
            return (parent, name, node, 0) if node.kind is _FILE else None
        if deep == none:
            return parent, name, None, none
        return parent, name, self._child(parent, name, _FILE), deep

    def _visit_files_many(self, leaves: list[_Node], read_leaf: np.ndarray, since: np.ndarray, far: np.ndarray,
                          jobs: Sequence[Hashable], job: np.ndarray, offset: np.ndarray, size: np.ndarray,
                          stamps: list[float], touched: dict) -> None:
        """The block visits of a batch at file and region nodes: read ``i`` visits file
        ``leaves[read_leaf[i]]`` from read ``since[i]`` on, and its region from
        read ``far[i]`` on."""
        reads = np.arange(len(read_leaf))
        visits = np.flatnonzero((read_leaf >= 0) & (reads >= since))
        in_region = visits[visits >= far[visits]]
        spans = 1 + int(offset.max()) // self.region_size
        regions = Groups(read_leaf[in_region] * spans + offset[in_region] // self.region_size)
        nodes = leaves + [self._region(leaves[c // spans], c % spans) for c in regions.ids.tolist()]
        node = np.concatenate((read_leaf[visits], len(leaves) + regions.of))
        self._visit_blocks_many(nodes, node, np.concatenate((visits, in_region)), jobs, job,
                                offset // self.block_size, size, stamps, touched)

    def _visit_blocks_many(self, nodes: list[_Node], node: np.ndarray, read: np.ndarray, jobs: Sequence[Hashable],
                           job: np.ndarray, block: np.ndarray, size: np.ndarray, stamps: list[float],
                           touched: dict) -> None:
        """Visits of read ``read[i]`` to block ``block[read[i]]`` at ``nodes[node[i]]``."""
        streams = Groups(node * len(jobs) + job[read])
        read, starts, ends = read[streams.order], streams.starts, streams.ends
        blocks = block[read]
        new = np.concatenate(([False], blocks[1:] != blocks[:-1]))  # a visit, past each stream's first read
        new[starts] = True
        pushed = blocks[new].tolist()
        bounds = np.cumsum(new)[ends - 1].tolist()
        firsts, lasts = read[starts].tolist(), read[ends - 1].tolist()
        counts, nbytes = (ends - starts).tolist(), np.add.reduceat(size[read], starts).tolist()
        lo = 0
        for g, code in enumerate(streams.ids.tolist()):
            at = nodes[code // len(jobs)]
            visited = self._batch_stream(at, jobs[code % len(jobs)], int(size[firsts[g]]), stamps[firsts[g]],
                                         counts[g], nbytes[g], stamps[lasts[g]])
            items = pushed[lo:bounds[g]]
            lo = bounds[g]
            if items[0] == visited.last:  # the stream was still in this block
                items = items[1:]
            if items:
                visited.last = items[-1]
                self._push_many(visited, items, False)
            touched[at] = max(touched.get(at, (-1, 0)), (lasts[g], -at.depth))

    def _batch_stream(self, node: _Node, job: Hashable, first_size: int, first_ts: float, accesses: int,
                      nbytes: int, last_ts: float):
        """A node's stream for ``job`` (new if none, opened by a read of ``first_size`` at ``first_ts``),
        with a batch's ``accesses`` and ``nbytes`` counted and its last read at ``last_ts``."""
        stream = node.streams.get(job)
        if stream is None:
            stream = self._new_stream(node, job, first_size, first_ts)
        stream.accesses += accesses
        stream.nbytes += nbytes
        stream.last_ts = last_ts
        return stream

    def _visit_dirs_many(self, parents: list[_Node], read_parent: np.ndarray, read_name: np.ndarray,
                         names: dict[str, int], jobs: Sequence[Hashable], job: np.ndarray, offset: np.ndarray,
                         size: np.ndarray, stamps: list[float], touched: dict) -> None:
        """The directory visits of a batch, level by level from the root.

        At each level the reads are ordered by directory and job (stably), and
        runs of one child collapse into one candidate visit, restarting if
        any of the run's reads is at offset 0: within a run, the first read
        the rule lets in makes the child the stream's ``last``, which stops
        the rest.
        """
        chains = [self._chain(p) for p in parents]
        depth = np.array([len(c) - 1 for c in chains])
        recorded = np.flatnonzero(read_parent >= 0)
        read_parent, read_name, job = read_parent[recorded], read_name[recorded], job[recorded]
        read_depth = depth[read_parent]
        for level in range(int(depth.max()) + 1):
            at = read_depth >= level
            sel, sel_parent, sel_depth = recorded[at], read_parent[at], read_depth[at]
            level_nodes: dict[_Node, int] = {}
            node_of = np.array([level_nodes.setdefault(c[level], len(level_nodes)) if len(c) > level else -1
                                for c in chains])
            child_of = np.array([names.setdefault(c[level + 1].name, len(names)) if len(c) > level + 1 else -1
                                 for c in chains])
            streams = Groups(node_of[sel_parent] * len(jobs) + job[at])
            o, starts, ends = streams.order, streams.starts, streams.ends
            keys = np.where(sel_depth > level, child_of[sel_parent], read_name[at])[o]
            restart = ((sel_depth == level) & (offset[sel] == 0))[o]
            sel = sel[o]
            new_run = np.concatenate(([True], keys[1:] != keys[:-1]))
            new_run[starts] = True
            run_starts = np.flatnonzero(new_run)
            run_keys = keys[run_starts].tolist()
            run_restart = np.logical_or.reduceat(restart, run_starts).tolist()
            bounds = [*np.searchsorted(run_starts, starts).tolist(), len(run_starts)]
            counts = (ends - starts).tolist()
            nbytes = np.add.reduceat(size[sel], starts).tolist()
            firsts, lasts = sel[starts].tolist(), sel[ends - 1].tolist()
            nodes, by_id = list(level_nodes), list(names)
            for g, code in enumerate(streams.ids.tolist()):
                dir_node = nodes[code // len(jobs)]
                dir_stream = self._batch_stream(dir_node, jobs[code % len(jobs)], int(size[firsts[g]]),
                                                stamps[firsts[g]], counts[g], nbytes[g], stamps[lasts[g]])
                last, recent, pushed = dir_stream.last, dir_stream.recent, []
                for key, restarted in zip(run_keys[bounds[g]:bounds[g + 1]], run_restart[bounds[g]:bounds[g + 1]]):
                    child = by_id[key]
                    if child != last and (restarted or child not in recent):
                        last = child
                        recent.append(child)
                        pushed.append(child)
                dir_stream.last = last
                self._push_many(dir_stream, pushed, True)
                if dir_node.kind is _DIR:
                    touched[dir_node] = max(touched.get(dir_node, (-1, 0)), (lasts[g], -dir_node.depth))

    @staticmethod
    def _chain(node: _Node) -> list[_Node]:
        """The nodes from the root down to ``node``."""
        chain = []
        while node is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]

    def _visit_file(self, node: _Node, job: Hashable, offset: int, size: int, ts: float) -> None:
        block = offset // self.block_size
        if node.children is not None or offset >= self.region_size:
            region = self._region(node, offset // self.region_size)
            self._visit_block(region, job, block, size, ts)
            self._nodes.move_to_end(region.key)
        self._visit_block(node, job, block, size, ts)
        self._nodes.move_to_end(node.key)

    def _visit_block(self, node: _Node, job: Hashable, block: int, size: int, ts: float) -> None:
        stream = node.streams.get(job)
        if stream is None:
            stream = self._new_stream(node, job, size, ts)
        stream.accesses += 1
        stream.nbytes += size
        stream.last_ts = ts
        if block != stream.last:
            stream.last = block
            self._push(stream, block, False)

    def _push(self, stream: _Stream, item: Hashable, directory: bool) -> None:
        items = stream.items
        if len(items) < self.window:
            items.append(item)
        else:
            items[stream.pos] = item
            stream.pos = (stream.pos + 1) % self.window
        stream.visits += 1
        if stream.visits >= stream.next_eval:
            self._evaluate(stream, directory)

    def _push_many(self, stream: _Stream, items: list, directory: bool) -> None:
        """:meth:`_push` each of ``items``, classifying at most once, after the last."""
        if not items:
            return
        ring, window = stream.items, self.window
        stream.visits += len(items)
        room = window - len(ring)
        if room > 0:
            ring.extend(items[:room])
            items = items[room:]
        if items:
            tail = items[-window:]
            start = (stream.pos + len(items) - len(tail)) % window
            head = min(len(tail), window - start)
            wrap = list if directory else (lambda part: array("q", part))
            ring[start:start + head] = wrap(tail[:head])
            ring[:len(tail) - head] = wrap(tail[head:])
            stream.pos = (stream.pos + len(items)) % window
        if stream.visits >= stream.next_eval:
            # While the ring fills, read by read it was last classified at the last threshold
            # passed (8, 16, 32, ...), over the visits up to it: so here too.
            upto = None
            if stream.visits < window:
                upto = stream.next_eval
                while 2 * upto <= stream.visits:
                    upto *= 2
            self._evaluate(stream, directory, upto)

    def _evaluate(self, stream: _Stream, directory: bool, upto: int | None = None) -> None:
        """Re-classify ``stream`` from its ring (its first ``upto`` visits) and refresh its rates."""
        visits = stream.ordered()[:upto]
        if directory:
            rank = {k: i for i, k in enumerate(sorted(set(visits)))}
            visits = np.fromiter((rank[k] for k in visits), dtype=np.int64, count=len(visits))
        verdict = analyze(visits, self.alpha)
        n = upto or stream.visits
        if verdict.label is not stream.verdict.label:
            stream.changed_ts, stream.changed_at = stream.last_ts, n
        stream.verdict = verdict
        stream.next_eval = 2 * n if n < self.window else n + self._period
        dt = stream.last_ts - stream.mark_ts
        if dt > 0:
            stream.rate = (stream.accesses - stream.mark_accesses) / dt
            stream.byte_rate = (stream.nbytes - stream.mark_bytes) / dt
            stream.mark_ts, stream.mark_accesses, stream.mark_bytes = (
                stream.last_ts, stream.accesses, stream.nbytes)

    def _new_stream(self, node: _Node, job: Hashable, size: int, ts: float) -> _Stream:
        streams = node.streams
        if len(streams) >= self.max_jobs:
            del streams[min(streams, key=lambda j: streams[j].last_ts)]
        stream = streams[job] = _Stream(node.kind in (_DIR, _ROOT), size, ts)
        return stream

    # -- nodes -------------------------------------------------------------

    def _parent(self, path: str) -> tuple[_Node | None, str]:
        """The directory node holding ``path`` (created as needed) and the last name.

        ``(None, "")`` for the empty path.
        """
        head, _, name = path.strip("/").rpartition("/")
        if not name:
            return None, ""
        parent = self._nodes.get(head) if head else self._root
        if parent is None or parent.kind is not _DIR:
            parent = self._root
            for part in head.split("/"):
                if part:
                    parent = self._child(parent, part, _DIR)
        return parent, name

    def _child(self, parent: _Node, name: str, kind: str) -> _Node | None:
        """Child ``name`` of directory ``parent``, created as ``kind`` if missing.

        A file whose path became a prefix is turned into a directory; a read
        of a path that is a directory (an object named like a prefix) has no
        file node: ``None``, and the read is not recorded.
        """
        child = parent.children.get(name)
        if child is None:
            path = f"{parent.path}/{name}" if parent.path else name
            child = parent.children[name] = self._nodes[path] = _Node(name, path, kind, parent)
        elif child.kind is not kind:
            if kind is _FILE:
                return None
            self._make_dir(child)
        return child

    def _make_dir(self, node: _Node) -> None:
        """Turn a file node into a directory (a path used as a prefix too)."""
        for region in (node.children or {}).values():
            del self._nodes[region.key]
        node.kind, node.children, node.streams = _DIR, {}, {}

    def _region(self, file: _Node, index: int) -> _Node:
        if file.children is None:
            file.children = {}
        region = file.children.get(index)
        if region is None:
            region = file.children[index] = _Node(index, file.path, _REGION, file)
            self._nodes[region.key] = region
        return region

    def _prune(self) -> None:
        """Drop the least recently touched nodes (never one with children) past ``max_nodes``."""
        while len(self._nodes) > self.max_nodes:
            _, node = self._nodes.popitem(last=False)
            siblings = node.parent.children
            del siblings[node.name]
            if node.parent.kind is _FILE and not siblings:
                node.parent.children = None

    def _node(self, path: str, offset: int | None = None) -> _Node | None:
        path = path.strip("/")
        if not path:
            return self._root
        node = self._nodes.get(path)
        if node is not None and offset is not None and node.kind is _FILE and node.children:
            return node.children.get(offset // self.region_size, node)
        return node

    # -- queries -----------------------------------------------------------

    def pattern(self, path: str, job: Hashable = None, offset: int | None = None) -> Pattern:
        """The label of ``path`` (``""`` is the root) for ``job``.

        With ``offset``, the label of the region of a big file holding it.
        ``job=None`` gives the label of the job stream with the most visits
        among those with a definite label (``unknown`` if none). A path the
        tree does not hold (never seen, or pruned) is ``unknown``.
        """
        node = self._node(path, offset)
        return Pattern.UNKNOWN if node is None else self._label(node, job)

    def levels(self, path: str, job: Hashable = None, offset: int | None = None) -> list[Level]:
        """Root-to-leaf labels along ``path``, down to the region of ``offset``.

        Stops at the deepest node the tree holds (a one-block file has none).
        """
        node = self._deepest(path, offset)
        chain = []
        while node is not None:
            chain.append(self._level(node, self._label(node, job)))
            node = node.parent
        return chain[::-1]

    def act_level(self, path: str, job: Hashable = None, offset: int | None = None) -> Level:
        """The level whose label a policy should act on for a read of ``path``.

        Start at the finest level with a definite label (region, file, then
        directories up), then climb while the parent is *sequential*: a scan
        over files is worth prefetching across them. A shuffled directory of
        files read front to back thus yields the file (sequential), a
        name-order scan the directory, a Zipf-read big file the file or
        region (skewed). With no definite label anywhere, the deepest node
        the tree holds.
        """
        leaf = node = self._deepest(path, offset)
        label = self._label(node, job)
        while label is Pattern.UNKNOWN and node.parent is not None:
            node = node.parent
            label = self._label(node, job)
        if label is Pattern.UNKNOWN:
            node = leaf
        while node.parent is not None and self._label(node.parent, job) is Pattern.SEQUENTIAL:
            node, label = node.parent, Pattern.SEQUENTIAL
        return self._level(node, label)

    def skewed_ancestor(self, path: str, job: Hashable = None) -> Level | None:
        """The nearest directory above ``path`` (below the root) whose children ``job``
        visits with skewed frequencies, or ``None``."""
        node = self._deepest(path, None)
        if node.path == path.strip("/"):
            node = node.parent
        while node is not None and node.parent is not None:
            if self._label(node, job) is Pattern.SKEWED:
                return self._level(node, Pattern.SKEWED)
            node = node.parent
        return None

    def climb(self, level: Level, job: Hashable, label: Pattern) -> Level:
        """The highest ancestor of ``level`` below the root that ``level`` reaches
        through ancestors labelled ``label`` for ``job`` (else ``level`` itself)."""
        node = self._node(level.path)
        if node is not None and level.region is not None:
            node = (node.children or {}).get(level.region)
        if node is None:
            return level
        top = node
        while top.parent is not None and top.parent.parent is not None and self._label(top.parent, job) is label:
            top = top.parent
        return level if top is node else self._level(top, label)

    def _deepest(self, path: str, offset: int | None) -> _Node:
        """The deepest node the tree holds along ``path`` (down to the region of ``offset``)."""
        path = path.strip("/")
        node = self._node(path, offset)
        while node is None:
            path = path.rpartition("/")[0]
            node = self._node(path)
        return node

    @staticmethod
    def _level(node: _Node, label: Pattern) -> Level:
        return Level(node.path, node.kind, node.name if node.kind is _REGION else None, label)

    def info(self, path: str, job: Hashable = None, offset: int | None = None) -> dict | None:
        """The :meth:`streams` entry of one stream (``job`` exactly), or ``None``."""
        node = self._node(path, offset)
        stream = None if node is None else node.streams.get(job)
        return None if stream is None else self._describe(node, job, stream)

    def streams(self, limit: int | None = None, min_samples: int = MIN_VISITS) -> list[dict]:
        """Streams with at least ``min_samples`` visits, most recently touched first.

        Each is a dict: ``path``, ``job``, ``level``, ``region``, ``label``,
        ``samples`` (visits the label rests on), ``visits``, ``accesses``,
        ``rate`` (accesses/s) and ``byte_rate`` (bytes/s) since the previous
        classification, and ``label_since``/``label_since_visit`` (time and
        visit count when the label last changed).
        """
        found = [(node, job, stream) for node in (self._root, *self._nodes.values())
                 for job, stream in node.streams.items() if stream.visits >= min_samples]
        recent = lambda entry: entry[2].last_ts  # noqa: E731
        found = (sorted(found, key=recent, reverse=True) if limit is None
                 else heapq.nlargest(limit, found, key=recent))
        return [self._describe(*entry) for entry in found]

    def _label(self, node: _Node, job: Hashable) -> Pattern:
        if job is not None:
            stream = node.streams.get(job)
            return Pattern.UNKNOWN if stream is None else stream.verdict.label
        best = max((s for s in node.streams.values() if s.verdict.label is not Pattern.UNKNOWN),
                   key=lambda s: s.verdict.visits, default=None)
        return Pattern.UNKNOWN if best is None else best.verdict.label

    @staticmethod
    def _describe(node: _Node, job: Hashable, stream: _Stream) -> dict:
        return {
            "path": node.path,
            "job": job,
            "level": node.kind,
            "region": node.name if node.kind is _REGION else None,
            "label": stream.verdict.label.value,
            "samples": stream.verdict.visits,
            "visits": stream.visits,
            "accesses": stream.accesses,
            "rate": stream.rate,
            "byte_rate": stream.byte_rate,
            "label_since": stream.changed_ts,
            "label_since_visit": stream.changed_at,
        }
