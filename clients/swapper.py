"""The cost model: what each copy in the dependency tree is worth, and the orders to move them in.

A node's value is the time it saves, per byte it occupies:

- probability of use: the node's uses over the requests of a recent window.
  The window is exponential with time constant ``window``: every use and every
  request decays by ``exp(-age / window)``, so the estimate is both a
  frequency over the window and a recency (a node unused for a few windows
  falls towards zero, a burst lifts it at once);
- on the device, the time a reload from the host would take (its size over the
  measured host->device bandwidth). Evicting a block that has no host copy
  also costs a device->host copy now: counted when the eviction makes room on
  a request's path (the request waits for it), not when the swapper evicts
  ahead of need; among equal values a node that already has a host copy goes
  first;
- in the host pool, the time its loss would cost: an adapter's re-read from
  the source (measured source bandwidth), a KV block's recomputation
  (``block_tokens`` tokens of prefill).

Eviction takes the lowest values first, only at leaves; prefetch takes the
most probable roots of host-resident subtrees first. Each order is a generator
that re-checks the tree after every move the caller makes, so a parent whose
last child just left becomes a candidate, and a child whose parent just
arrived does.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Callable, Collection, Iterator

from igtcache.clients.kv_tree import AdapterNode, DependencyTree, KVNode, Node


class CostModel:
    """Usage probabilities and values of nodes; ``bandwidth(kind)`` gives bytes/s for ``h2d``, ``d2h``, ``source``."""

    def __init__(self, *, window: float, block_tokens: int, prefill_token_s: float,
                 bandwidth: Callable[[str], float]) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self.block_tokens = block_tokens
        self.prefill_token_s = prefill_token_s
        self.bandwidth = bandwidth
        self._requests = 0.0
        self._requests_at = 0.0

    def _decayed(self, value: float, since: float, now: float) -> float:
        return value * math.exp(-max(0.0, now - since) / self.window)

    def request(self, now: float) -> None:
        """One more request arrived (the denominator of every probability)."""
        self._requests = self._decayed(self._requests, self._requests_at, now) + 1.0
        self._requests_at = now

    def use(self, node: Node, now: float) -> None:
        """``node`` served a request."""
        node.uses = self._decayed(node.uses, node.used_at, now) + 1.0
        node.used_at = now

    def probability(self, node: Node, now: float) -> float:
        """Estimated probability that the next request uses ``node``."""
        requests = self._decayed(self._requests, self._requests_at, now)
        return min(1.0, self._decayed(node.uses, node.used_at, now) / max(requests, 1.0))

    def device_value(self, node: Node, now: float, on_path: bool = False) -> float:
        """Seconds saved per byte by keeping ``node`` on the device rather than in the host pool;
        ``on_path``: the eviction would delay a request, so a write-back counts too."""
        write_back = 1.0 / self.bandwidth("d2h") if on_path and node.host is None else 0.0
        return self.probability(node, now) / self.bandwidth("h2d") + write_back

    def host_value(self, node: Node, now: float) -> float:
        """Seconds saved per byte by keeping ``node``'s host copy rather than losing it."""
        size = max(node.nbytes, 1)
        if isinstance(node, AdapterNode):
            restore = size / self.bandwidth("source")
        else:
            restore = self.block_tokens * self.prefill_token_s
        return self.probability(node, now) * restore / size


class RecencyModel(CostModel):
    """Least recently used first in both pools, in place of the cost model's values (an ablation): a node's
    value is the time of its last use. Prefetch still follows the usage probabilities."""

    def device_value(self, node: Node, now: float, on_path: bool = False) -> float:
        return node.used_at

    def host_value(self, node: Node, now: float) -> float:
        return node.used_at


RANKINGS = {"cost": CostModel, "lru": RecencyModel}


def device_victims(tree: DependencyTree, model: CostModel, now: float, keep: Collection[Node] = (),
                   on_path: bool = False) -> Iterator[Node]:
    """Device leaves outside ``keep``, lowest value first; a parent joins once its last device child has left."""
    tie = itertools.count()
    heap = [(model.device_value(n, now, on_path), n.host is None, next(tie), n)
            for n in tree.device_leaves() if n not in keep]
    heapq.heapify(heap)
    while heap:
        node = heapq.heappop(heap)[-1]
        if node.dev is None or node.refs or node.dev_children:
            continue
        yield node
        parent = node.parent
        if (node.dev is None and parent is not None and parent.dev is not None and not parent.dev_children
                and not parent.refs and parent not in keep):
            heapq.heappush(heap, (model.device_value(parent, now, on_path), parent.host is None, next(tie), parent))


def host_victims(tree: DependencyTree, model: CostModel, now: float, keep: Collection[Node] = ()) -> Iterator[Node]:
    """Host copies outside ``keep`` to give up: first those duplicating a device copy (the ones
    likeliest to stay on the device first), then host-only adapters and KV leaves, lowest value
    first; a KV parent joins once its last child is gone."""
    tie = itertools.count()
    duplicates = [(-model.device_value(n, now), next(tie), n) for n in tree.on_host if n.dev is not None and n not in keep]
    heapq.heapify(duplicates)
    while duplicates:
        node = heapq.heappop(duplicates)[2]
        if node.host is not None and node.dev is not None:
            yield node
    heap = [(model.host_value(n, now), next(tie), n) for n in tree.on_host if _host_droppable(n) and n not in keep]
    heapq.heapify(heap)
    while heap:
        node = heapq.heappop(heap)[2]
        if node.host is None or not _host_droppable(node):
            continue
        parent = node.parent
        yield node
        if isinstance(parent, KVNode) and parent.host is not None and _host_droppable(parent) and parent not in keep:
            heapq.heappush(heap, (model.host_value(parent, now), next(tie), parent))


def _host_droppable(node: Node) -> bool:
    """A host-only copy whose loss strands nothing: an adapter (re-readable), or a KV block with no children."""
    return node.dev is None and (isinstance(node, AdapterNode) or not node.children)


def prefetch_candidates(tree: DependencyTree, model: CostModel, now: float, min_probability: float) -> Iterator[Node]:
    """Roots of host-resident subtrees, most probable first; children join once their parent is on the device,
    and a root whose parent has left meanwhile (displaced by an earlier candidate) is skipped."""
    tie = itertools.count()
    heap = [(-p, next(tie), n) for n in tree.host_roots() if (p := model.probability(n, now)) >= min_probability]
    heapq.heapify(heap)
    while heap:
        node = heapq.heappop(heap)[2]
        if node.dev is not None or node.host is None or (node.parent is not None and node.parent.dev is None):
            continue
        yield node
        if node.dev is not None:
            for child in node.children.values():
                if child.dev is None and child.host is not None and (p := model.probability(child, now)) >= min_probability:
                    heapq.heappush(heap, (-p, next(tie), child))
