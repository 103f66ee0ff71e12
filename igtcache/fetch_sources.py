"""Where a block the node tiers lack comes from: the remote, or the cluster tier in front of it.

The engine's fetch backend. Each source resolves ``fetch(key, start, end)``
to a :class:`Fetched`: the bytes and which tier gave them, or fails with the
remote's error. Callbacks chain the steps, so no thread waits on another
tier's answer.

With a cluster tier (:class:`ClusterSource`) a fetch tries the cluster first.
On a miss it takes the block's cluster-wide lease: the holder looks once
more (another holder may have published meanwhile), then fetches from the
remote and may publish what it got; a node that finds the lease taken
waits (bounded) for the holder's block and fetches it itself if none comes.
Whatever the cluster does -- errors, timeouts, an open circuit, damaged
values -- the fetch ends in the remote's bytes or the remote's error.

On the remote link demand goes first (:class:`DemandFirst`): a fetch a read
waits for starts at once; readahead starts only while fewer than ``slots``
fetches are on the link, in issue order, and a read that comes to wait for
a queued readahead block starts it at once (:meth:`RemoteSource.promote`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from typing import Callable, Hashable, NamedTuple

from igtcache.cluster_tier import ClusterTier
from igtcache.policies import BlockKey
from igtcache.remote import Remote

log = logging.getLogger(__name__)

REMOTE, CLUSTER = "remote", "cluster"
#: Fetches on the remote link at once before readahead waits: 8 blocks of 4 MiB
#: keep a link of a few hundred MB/s busy over tens of ms of latency, and a demand
#: fetch then shares the link with at most that much readahead.
LINK_SLOTS = 8


class Fetched(NamedTuple):
    """A fetched block's bytes and the tier they came from (``"remote"`` or ``"cluster"``)."""

    data: bytes
    source: str


class DemandFirst:
    """Orders fetches on one link: demand at once, readahead in the slots demand leaves.

    ``submit`` takes a function that starts a fetch and returns its future;
    a demand fetch starts at once (even past ``slots``), readahead waits in
    issue order until fewer than ``slots`` fetches are running. Thread-safe:
    one lock, never held while a fetch starts or completes.
    """

    def __init__(self, slots: int = LINK_SLOTS) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.running = 0
        self._queued: OrderedDict[Hashable, tuple[Callable[[], concurrent.futures.Future],
                                                  concurrent.futures.Future]] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, token: Hashable, start: Callable[[], concurrent.futures.Future], *,
               readahead: bool) -> concurrent.futures.Future:
        """A future of what ``start()``'s future gives, started now or when a slot frees."""
        out: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if readahead and (self._queued or self.running >= self.slots):
                self._queued[token] = (start, out)
                return out
            self.running += 1
        self._run(start, out)
        return out

    def promote(self, token: Hashable) -> None:
        """A read waits for ``token``: if it is still queued, start it now."""
        with self._lock:
            entry = self._queued.pop(token, None)
            if entry is None:
                return
            self.running += 1
        self._run(*entry)

    def queued(self) -> int:
        with self._lock:
            return len(self._queued)

    def _run(self, start: Callable[[], concurrent.futures.Future], out: concurrent.futures.Future) -> None:
        try:
            step = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._done()
            out.set_exception(exc)
            return

        def done(_: concurrent.futures.Future) -> None:
            self._done()
            _copy(step, out)

        step.add_done_callback(done)

    def _done(self) -> None:
        """A fetch left the link: start queued readahead into the free slots."""
        with self._lock:
            self.running -= 1
            ready = []
            while self._queued and self.running < self.slots:
                ready.append(self._queued.popitem(last=False)[1])
                self.running += 1
        for start, out in ready:
            self._run(start, out)


class RemoteSource:
    """The remote itself: every fetch pinned to the block's version, demand before readahead."""

    def __init__(self, remote: Remote, slots: int = LINK_SLOTS) -> None:
        self.remote = remote
        self.order = DemandFirst(slots)

    def fetch(self, key: BlockKey, start: int, end: int, *, readahead: bool = False) -> concurrent.futures.Future:
        """A future of the :class:`Fetched` bytes ``[start, end)`` of ``key``'s object."""
        out: concurrent.futures.Future = concurrent.futures.Future()
        fetched = self.order.submit(key, lambda: self.remote.fetch(key.path, start, end, version=key.version),
                                    readahead=readahead)
        _chain(fetched, out, lambda data: out.set_result(Fetched(data, REMOTE)))
        return out

    def promote(self, key: BlockKey) -> None:
        """A read now waits for ``key``'s readahead: it goes first if still queued."""
        self.order.promote(key)

    def close(self) -> None:
        """Nothing of its own to close: the engine owns the remote."""


class ClusterSource:
    """The cluster tier in front of a :class:`RemoteSource`.

    ``share(key)`` says whether a block fetched from the remote is worth
    publishing (the node's policy decides); ``wait_s`` bounds the wait for
    another node's fetch of the same block.
    """

    def __init__(self, cluster: ClusterTier, origin: RemoteSource, share: Callable[[BlockKey], bool],
                 wait_s: float) -> None:
        self.cluster = cluster
        self.origin = origin
        self.share = share
        self.wait_s = wait_s

    def fetch(self, key: BlockKey, start: int, end: int, *, readahead: bool = False) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()

        def looked_up(data: bytes | None) -> None:
            if data is not None:
                out.set_result(Fetched(data, CLUSTER))
            else:
                _chain(self.cluster.lease(key), out, leased)

        def leased(ours: bool) -> None:
            if ours:  # look once more: a holder may have published and let go since our lookup
                _chain(self.cluster.fetch_block(key, start, end), out, looked_again)
            else:
                _chain(self.cluster.wait_published(key, start, end, self.wait_s), out, waited)

        def looked_again(data: bytes | None) -> None:
            if data is not None:
                self.cluster.release(key)
                out.set_result(Fetched(data, CLUSTER))
            else:
                self._fetch_and_publish(key, start, end, out, readahead)

        def waited(data: bytes | None) -> None:
            if data is not None:
                out.set_result(Fetched(data, CLUSTER))
            else:  # the holder gave up or is slow: fetch it ourselves
                self._fetch_and_publish(key, start, end, out, readahead)

        _chain(self.cluster.fetch_block(key, start, end), out, looked_up)
        return out

    def promote(self, key: BlockKey) -> None:
        self.origin.promote(key)

    def _fetch_and_publish(self, key: BlockKey, start: int, end: int, out: concurrent.futures.Future,
                           readahead: bool) -> None:
        fetched = self.origin.fetch(key, start, end, readahead=readahead)

        def done(_: concurrent.futures.Future) -> None:
            try:
                if fetched.exception() is None and self.share(key):
                    self.cluster.publish(key, fetched.result().data)
            except Exception:  # noqa: BLE001 - publishing is best effort; the read has its bytes
                log.debug("publishing block %d of %r failed", key.index, key.path, exc_info=True)
            finally:
                self.cluster.release(key)  # after the publish is queued: waiters then find the block
                _copy(fetched, out)

        fetched.add_done_callback(done)

    def close(self) -> None:
        self.cluster.close()


def _chain(step: concurrent.futures.Future, out: concurrent.futures.Future, then: Callable) -> None:
    """When ``step`` succeeds call ``then(result)``; when it fails (or ``then`` does) fail ``out``."""

    def done(_: concurrent.futures.Future) -> None:
        try:
            then(step.result())
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            if not out.done():
                out.set_exception(exc)

    step.add_done_callback(done)


def _copy(source: concurrent.futures.Future, out: concurrent.futures.Future) -> None:
    exc = source.exception()
    if exc is not None:
        out.set_exception(exc)
    else:
        out.set_result(source.result())
