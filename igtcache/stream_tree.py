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
from typing import Hashable, NamedTuple

import numpy as np

from igtcache.patterns import MIN_VISITS, Pattern, Verdict, analyze

#: A child among a directory stream's last this-many visits is still "open".
DIR_RECENT = 8

_ROOT, _DIR, _FILE, _REGION = "root", "dir", "file", "region"
_UNSEEN = Verdict(Pattern.UNKNOWN, 0)


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

    __slots__ = ("name", "path", "key", "kind", "parent", "children", "streams")

    def __init__(self, name: str | int, path: str, kind: str, parent: _Node | None) -> None:
        self.name = name
        self.path = path
        self.kind = kind
        self.parent = parent
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

    def _evaluate(self, stream: _Stream, directory: bool) -> None:
        """Re-classify ``stream`` from its ring and refresh its rates."""
        visits = stream.ordered()
        if directory:
            rank = {k: i for i, k in enumerate(sorted(set(visits)))}
            visits = np.fromiter((rank[k] for k in visits), dtype=np.int64, count=len(visits))
        verdict = analyze(visits, self.alpha)
        if verdict.label is not stream.verdict.label:
            stream.changed_ts, stream.changed_at = stream.last_ts, stream.visits
        stream.verdict = verdict
        n = stream.visits
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
        path = path.strip("/")
        node = self._node(path, offset)
        while node is None:
            path = path.rpartition("/")[0]
            node = self._node(path)
        chain = []
        while node is not None:
            region = node.name if node.kind is _REGION else None
            chain.append(Level(node.path, node.kind, region, self._label(node, job)))
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
        chain = self.levels(path, job, offset)[::-1]
        i = next((k for k, lv in enumerate(chain) if lv.label is not Pattern.UNKNOWN), 0)
        while i + 1 < len(chain) and chain[i + 1].label is Pattern.SEQUENTIAL:
            i += 1
        return chain[i]

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
