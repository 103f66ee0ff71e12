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
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable, NamedTuple

from igtcache.cluster_tier import ClusterTier
from igtcache.policies import BlockKey
from igtcache.remote import Remote

log = logging.getLogger(__name__)

REMOTE, CLUSTER = "remote", "cluster"


class Fetched(NamedTuple):
    """A fetched block's bytes and the tier they came from (``"remote"`` or ``"cluster"``)."""

    data: bytes
    source: str


class RemoteSource:
    """The remote itself: every fetch pinned to the block's version."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def fetch(self, key: BlockKey, start: int, end: int) -> concurrent.futures.Future:
        """A future of the :class:`Fetched` bytes ``[start, end)`` of ``key``'s object."""
        out: concurrent.futures.Future = concurrent.futures.Future()
        _chain(self.remote.fetch(key.path, start, end, version=key.version), out,
               lambda data: out.set_result(Fetched(data, REMOTE)))
        return out

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

    def fetch(self, key: BlockKey, start: int, end: int) -> concurrent.futures.Future:
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
                self._fetch_and_publish(key, start, end, out)

        def waited(data: bytes | None) -> None:
            if data is not None:
                out.set_result(Fetched(data, CLUSTER))
            else:  # the holder gave up or is slow: fetch it ourselves
                self._fetch_and_publish(key, start, end, out)

        _chain(self.cluster.fetch_block(key, start, end), out, looked_up)
        return out

    def _fetch_and_publish(self, key: BlockKey, start: int, end: int, out: concurrent.futures.Future) -> None:
        fetched = self.origin.fetch(key, start, end)

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
