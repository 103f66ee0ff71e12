"""The cluster tier: blocks shared by every node through a Redis Cluster.

A :class:`igtcache.block_store.BlockSource` that is only an accelerator: a
miss, an error, a timeout, a damaged value and an open circuit all resolve a
fetch to ``None``, and the caller goes to the remote. Nothing here raises
into a read.

Concurrency: every Redis command runs on one event loop -- the one given, or
a thread with its own loop that the tier owns for its lifetime -- through one
``redis.asyncio.cluster.RedisCluster`` client. Public methods may be called
from any thread; they hand a coroutine to the loop and return a
``concurrent.futures.Future``. Counters are guarded by a lock; the circuit
breakers and the publish queue live on the loop.

* Every command has a deadline (``timeout``; ``publish_timeout`` for writes).
  redis-py's own retries are off: a command fails once, and the breaker
  decides.
* Per node, a :class:`CircuitBreaker` opens after consecutive failures; while
  open, commands for the node's slots resolve at once without I/O. Until the
  first slot map is loaded, one breaker stands for the whole cluster. A node
  that leaves the slot map (a dead master whose replica took over) takes its
  breaker with it.
* Publishing goes through a queue bounded in bytes; past the bound a block is
  dropped and counted, never waited for.
* Leases (``SET NX PX`` on the block's lease key) make a fetch from the remote
  single-flight across nodes; a release waits for this tier's queued
  publishes of that block, so a waiter that sees neither lease nor block
  knows that none is coming.

Key and value layout: :mod:`igtcache.cluster_format`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import uuid
from collections import Counter
from typing import Any, Awaitable, Callable, NoReturn

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from igtcache.cluster_breaker import CircuitBreaker
from igtcache.cluster_format import KeySpace, decode, encode
from igtcache.cluster_url import parse_cluster_url
from igtcache.policies import BlockKey

log = logging.getLogger(__name__)

MiB = 1 << 20
PUBLISH_CONCURRENCY = 4  # SETs in flight at once from the publish queue
# Commands in flight at once. The client's one loop parses every reply (~200-500 MiB/s
# here), so more at once only queue there and run into their deadlines: 8 blocks of
# 4 MiB take ~80 ms.
MAX_IN_FLIGHT = 8
WAIT_POLL_START, WAIT_POLL_MAX = 0.005, 0.1  # wait_published's backoff, seconds
WHOLE_CLUSTER = "cluster"  # the breaker until the first slot map (no node known yet)

# The node did not answer: these count against its circuit. A RedisClusterException
# from a command means redis-py, reloading its slot map after a failure, reached no
# node at all. Any other RedisError (a refused command, a wrong type) is an answer.
NODE_FAILURES = (TimeoutError, RedisTimeoutError, RedisConnectionError, ClusterDownError, OSError,
                 RedisClusterException)
# After these redis-py drops its slot map and would reload it inside the next command,
# where a command's deadline could cut the reload short: parsing the reply to COMMAND
# alone takes 0.1-0.25 s here. The tier reloads it in a task of its own instead.
MAP_DROPPED = (RedisTimeoutError, RedisConnectionError, ClusterDownError, RedisClusterException)

# Deletes a lease only if this tier still holds it (it may have expired and been taken).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class _Unavailable(Exception):
    """A command was not run (open circuit) or failed; already counted."""


class ClusterTier:
    """Blocks of one remote at one block size, shared through a Redis Cluster at ``url``.

    ``remote_id`` names the remote (e.g. its URL and endpoint): tiers with
    different ids, block sizes or prefixes never see each other's blocks.
    ``loop``: a running event loop in another thread to run on; by default
    the tier starts a thread with a loop of its own.
    """

    def __init__(
        self,
        url: str,
        *,
        remote_id: str,
        block_size: int,
        prefix: str = "igtcache",
        timeout: float = 0.25,
        publish_timeout: float = 2.0,
        publish_queue_bytes: int = 64 * MiB,
        lease_ms: int = 2000,
        circuit_failures: int = 3,
        circuit_cooldown: float = 5.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._url = parse_cluster_url(url)
        self._keys = KeySpace(prefix, remote_id, block_size)
        self.block_size = block_size
        self.timeout = timeout
        self.publish_timeout = publish_timeout
        self.publish_queue_bytes = publish_queue_bytes
        self.lease_ms = lease_ms
        self._circuit_settings = (circuit_failures, circuit_cooldown)
        self._token = uuid.uuid4().hex  # this tier's lease value
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._queued_bytes = 0
        self._closed = False
        # Loop-side state, created and used on the loop only.
        self._client: RedisCluster | None = None
        self._started: asyncio.Future | None = None
        self._reload: asyncio.Future | None = None  # of the error, or None, of a slot map reload
        self._breakers = {WHOLE_CLUSTER: CircuitBreaker(circuit_failures, circuit_cooldown)}
        self._queue: asyncio.Queue | None = None
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._workers: list[asyncio.Task] = []
        self._publishing: dict[str, set[asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()  # our coroutines in flight, for close()
        if loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread: threading.Thread | None = threading.Thread(
                target=self._loop.run_forever, name="igtcache-cluster", daemon=True)
            self._thread.start()
        else:
            self._loop, self._thread = loop, None
        self._loop.call_soon_threadsafe(self._start_publishing)

    # ---- public API (any thread) ----

    def key_name(self, key: BlockKey) -> str:
        """The Redis key that holds ``key``'s block."""
        return self._keys.block(key)

    def fetch_block(self, key: BlockKey, start: int, end: int) -> concurrent.futures.Future:
        """A future of the block's bytes ``[start, end)`` of the object, or of ``None`` (miss, error,
        timeout, open circuit, overload, damaged value). ``start`` must be the block's offset and ``end``
        the block's end (the object's end for its last block)."""
        self._check_range(key, start, end)
        return self._submit(self._fetch(key, end - start), None)

    def publish(self, key: BlockKey, data: bytes | memoryview) -> bool:
        """Queue ``data`` (the whole block, not changed afterwards) for storing; returns at once.

        ``False`` if it was dropped: the queue holds ``publish_queue_bytes``
        already, or the tier is closed."""
        if not 0 < len(data) <= self.block_size:
            raise ValueError(f"a block holds 1..{self.block_size} bytes, got {len(data)}")
        with self._lock:
            if self._closed or self._queued_bytes + len(data) > self.publish_queue_bytes:
                self._counts["publish_dropped"] += 1
                return False
            self._queued_bytes += len(data)
        try:
            self._loop.call_soon_threadsafe(self._enqueue, self._keys.block(key), data)
        except RuntimeError:  # the loop was closed under us
            with self._lock:
                self._queued_bytes -= len(data)
                self._counts["publish_dropped"] += 1
            return False
        return True

    def fetch_meta(self, path: str) -> concurrent.futures.Future:
        """A future of ``(payload, age_s)``: the metadata another node published for ``path``
        and how long ago, or of ``None`` (none, expired, damaged, or the cluster unavailable)."""
        return self._submit(self._fetch_meta(path), None)

    def publish_meta(self, path: str, payload: bytes, ttl: float) -> concurrent.futures.Future:
        """Store ``payload`` as ``path``'s shared metadata for ``ttl`` seconds; a future of
        whether it was stored. Small values go straight out, not through the block queue."""
        return self._submit(self._publish_meta(path, payload, ttl), False)

    def lease(self, key: BlockKey) -> concurrent.futures.Future:
        """A future of ``True`` when the caller should fetch the block from the remote itself: it
        now holds the cluster-wide lease (for ``lease_ms``), or the cluster could not be asked.
        ``False``: another node holds the lease; ``wait_published`` for its block."""
        return self._submit(self._lease(key), True)

    def wait_published(self, key: BlockKey, start: int, end: int, timeout: float) -> concurrent.futures.Future:
        """A future of the block once another node has published it, or of ``None`` when
        ``timeout`` seconds pass (plus at most one command's deadline), or when the lease
        is gone and the block is not there (its holder gave up)."""
        self._check_range(key, start, end)
        return self._submit(self._wait(key, end - start, timeout), None)

    def release(self, key: BlockKey) -> concurrent.futures.Future:
        """Give up this tier's lease on ``key`` (after publishing it, or after a failed fetch).
        The lease goes once this tier's queued publishes of the block are stored or dropped."""
        return self._submit(self._release(key), None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every block queued so far is stored or has failed; ``False`` on timeout."""
        if self._closed:
            return True
        future = asyncio.run_coroutine_threadsafe(self._drained(), self._loop)
        try:
            future.result(timeout)
            return True
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False

    def stats(self) -> dict[str, Any]:
        """Counters since start, the bytes queued for publishing, and each node's circuit state
        (``circuit``: node name -> state; only ``cluster`` until a first slot map is loaded).

        ``hits``/``misses``/``corrupt``/``mismatched`` count ``fetch_block`` outcomes
        (``mismatched``: a valid block of another length than asked). ``errors``
        (``timeouts`` among them) count failed commands; ``circuit_skips`` and ``busy``
        commands not sent (an open circuit; ``MAX_IN_FLIGHT`` commands running for a
        whole deadline). ``published``/``publish_bytes``/``publish_dropped``/
        ``publish_failed`` count the publish queue, ``leases``/``lease_denied``/
        ``waits_served``/``waits_missed`` the single-flight."""
        with self._lock:
            counts = dict(self._counts)
            queued = self._queued_bytes
        names = ("hits", "misses", "errors", "timeouts", "corrupt", "mismatched", "circuit_skips", "busy",
                 "published", "publish_bytes", "publish_dropped", "publish_failed", "leases", "lease_denied",
                 "waits_served", "waits_missed", "meta_hits", "meta_published")
        out: dict[str, Any] = {name: counts.get(name, 0) for name in names}
        breakers = dict(self._breakers)
        out["publish_queue_bytes"] = queued
        out["circuit_opens"] = counts.get("circuit_opens", 0)
        out["circuit"] = {name: b.state for name, b in sorted(breakers.items())}
        return out

    def close(self) -> None:
        """Drop what is still queued, close the connections and, if the tier owns its loop, stop it.
        Not from the loop's own thread. Later fetches resolve to ``None``."""
        if self._thread is None and _running_loop() is self._loop:
            raise RuntimeError("ClusterTier.close() would wait for its own event loop's thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5 * self.publish_timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("cluster tier: closing did not finish cleanly: %r", exc)
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "ClusterTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing ----

    def _check_range(self, key: BlockKey, start: int, end: int) -> None:
        if start != key.index * self.block_size or not 0 < end - start <= self.block_size:
            raise ValueError(f"[{start}, {end}) is not block {key.index} at block size {self.block_size}, "
                             "nor the object's last part of it")

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _submit(self, coro: Awaitable, default: Any) -> concurrent.futures.Future:
        if not self._closed:
            try:
                return asyncio.run_coroutine_threadsafe(self._guarded(coro, default), self._loop)
            except RuntimeError:  # loop closed
                pass
        coro.close()
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(default)
        return done

    async def _guarded(self, coro: Awaitable, default: Any) -> Any:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            return await coro
        except _Unavailable:
            return default
        except asyncio.CancelledError:
            if self._closed:  # close() cancelled us: the caller gets the answer for "unavailable"
                return default
            raise
        except Exception:  # an accelerator never fails a read, but a bug should be seen
            log.exception("cluster tier: unexpected error")
            self._count("errors")
            return default
        finally:
            self._tasks.discard(task)

    async def _ready(self) -> RedisCluster:
        """The client, with its first slot map loaded (later ones: ``_reloaded``)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._connect())
        if not self._started.done():
            await asyncio.shield(self._started)
        elif self._started.exception() is not None:
            self._started = asyncio.ensure_future(self._connect())
            await asyncio.shield(self._started)
        assert self._client is not None
        return self._client

    async def _connect(self) -> None:
        url = self._url
        if self._client is None:
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],
                username=url.username, password=url.password, ssl=url.tls, **url.tls_options,
                require_full_coverage=False,
                retry=Retry(NoBackoff(), 0),  # the breaker, not redis-py, decides what to try again
                socket_timeout=max(self.timeout, self.publish_timeout), socket_connect_timeout=self.timeout,
            )
        await self._client.initialize()

    async def _connected(self, timeout: float) -> RedisCluster:
        """The client once it has a slot map; until then the whole cluster's circuit decides."""
        if self._started is not None and self._started.done() and self._started.exception() is None:
            return self._client
        breaker = self._breakers[WHOLE_CLUSTER]
        if not breaker.allow():
            self._count("circuit_skips")
            raise _Unavailable
        try:
            client = await asyncio.wait_for(self._ready(), timeout)
        except (*NODE_FAILURES, RedisError) as exc:
            self._failed(WHOLE_CLUSTER, breaker, exc, unreachable=True)  # no node gave a slot map
        self._breakers.pop(WHOLE_CLUSTER, None)  # from now on each node has a circuit of its own
        return client

    def _route(self, client: RedisCluster, rkey: str) -> tuple[str, CircuitBreaker]:
        """The node that serves ``rkey`` in the current slot map, and its circuit."""
        try:
            node = client.get_node_from_key(rkey).name
        except RedisClusterException:  # a slot no node serves: that key only, no node to blame
            self._count("errors")
            raise _Unavailable from None
        return node, self._breaker(client, node)

    def _breaker(self, client: RedisCluster, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            # A node not used before: redis-py's slot map changed (a replica took over a dead
            # master's slots, say). Forget the circuits of nodes no longer in it, or a dead
            # master would stay "open" in stats() for good.
            serving = {node.name for node in client.get_nodes()}
            self._breakers = {n: b for n, b in self._breakers.items() if n in serving}
            breaker = self._breakers[name] = CircuitBreaker(*self._circuit_settings)
        return breaker

    async def _command(self, rkey: str, call: Callable[[RedisCluster], Awaitable], timeout: float) -> Any:
        """Run ``call`` for ``rkey`` within ``timeout`` unless its node's circuit is open.
        Raises ``_Unavailable`` (counted) where it did not succeed."""
        client = await self._connected(timeout)
        node, breaker = self._route(client, rkey)
        if not breaker.allow():
            self._count("circuit_skips")
            raise _Unavailable
        # Waits on our side say nothing about the node: each is bounded on its own, and
        # running out of time is a miss counted as busy that leaves the circuit alone.
        if self._reload is not None:
            try:
                await self._reloaded(client, timeout)
            except TimeoutError:
                self._count("busy")
                raise _Unavailable from None
            except (*NODE_FAILURES, RedisError) as exc:  # no node gave a slot map, the key's node neither
                self._failed(node, breaker, exc, unreachable=True)
            moved_to, new_breaker = self._route(client, rkey)  # to a replica that took over, say
            if moved_to != node:
                node, breaker = moved_to, new_breaker
                if not breaker.allow():
                    self._count("circuit_skips")
                    raise _Unavailable
        try:
            await asyncio.wait_for(self._in_flight.acquire(), timeout)
        except TimeoutError:
            self._count("busy")
            raise _Unavailable from None
        try:
            result = await asyncio.wait_for(call(client), timeout)
        except (*NODE_FAILURES, RedisError) as exc:
            if isinstance(exc, MAP_DROPPED):
                self._start_reload()
            self._failed(node, breaker, exc, unreachable=isinstance(exc, NODE_FAILURES))
        finally:
            self._in_flight.release()
        breaker.success()
        return result

    async def _reloaded(self, client: RedisCluster, timeout: float) -> None:
        """Wait at most ``timeout`` for the slot map reload a node failure started (or start it
        again if it failed); raises ``TimeoutError``, or the reload's error."""
        reload = self._reload
        if reload.done() and reload.result() is not None:
            reload = self._reload = asyncio.ensure_future(self._reload_map(client))
        error = await asyncio.wait_for(asyncio.shield(reload), timeout)
        if error is not None:
            raise error
        if self._reload is reload:
            self._reload = None

    def _start_reload(self) -> None:
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._reload_map(self._client))

    @staticmethod
    async def _reload_map(client: RedisCluster) -> Exception | None:
        """Reload the slot map (where redis-py dropped it); the error if no node gave one."""
        try:
            await client.initialize()
        except (*NODE_FAILURES, RedisError) as exc:
            return exc
        return None

    def _failed(self, node: str, breaker: CircuitBreaker, exc: Exception, *, unreachable: bool) -> NoReturn:
        """Count a failed command; ``unreachable`` ones count against ``node``'s circuit."""
        self._count("errors")
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):
            self._count("timeouts")
        if unreachable:
            opened = breaker.times_opened
            breaker.failure()
            if breaker.times_opened > opened:
                self._count("circuit_opens")
                log.warning("cluster tier: %s failed %d times in a row (last: %r); skipping it for %g s",
                            node, breaker.failures, exc, breaker.cooldown)
        else:
            breaker.success()  # it answered, with a refusal
        raise _Unavailable from exc

    def _verified(self, rkey: str, value: bytes | None, length: int) -> bytes | None:
        """The block in ``value`` if it is intact and ``length`` long; a damaged value is deleted."""
        if value is None:
            return None
        data = decode(value)
        if data is None:
            self._count("corrupt")
            asyncio.ensure_future(self._guarded(self._command(rkey, lambda c: c.delete(rkey), self.timeout), None))
            return None
        if len(data) != length:
            self._count("mismatched")
            return None
        return data

    async def _fetch(self, key: BlockKey, length: int) -> bytes | None:
        rkey = self._keys.block(key)
        try:
            value = await self._command(rkey, lambda c: c.get(rkey), self.timeout)
        except _Unavailable:
            self._count("misses")
            raise
        data = self._verified(rkey, value, length)
        self._count("hits" if data is not None else "misses")
        return data

    async def _fetch_meta(self, path: str) -> tuple[bytes, float] | None:
        mkey = self._keys.meta(path)
        value = await self._command(mkey, lambda c: c.get(mkey), self.timeout)
        if value is None:
            return None
        payload = decode(value)
        if payload is None:
            self._count("corrupt")
            await self._command(mkey, lambda c: c.delete(mkey), self.timeout)
            return None
        stored = json.loads(payload)
        left_ms = await self._command(mkey, lambda c: c.pttl(mkey), self.timeout)
        if not isinstance(left_ms, int) or left_ms <= 0:
            return None  # expired meanwhile, or stored without an expiry by someone else
        self._count("meta_hits")
        return stored["payload"].encode(), max(0.0, stored["ttl_ms"] - left_ms) / 1000

    async def _publish_meta(self, path: str, payload: bytes, ttl: float) -> bool:
        ttl_ms = int(ttl * 1000)
        if ttl_ms <= 0:
            return False
        mkey = self._keys.meta(path)
        value = encode(json.dumps({"payload": payload.decode(), "ttl_ms": ttl_ms}).encode())
        await self._command(mkey, lambda c: c.set(mkey, value, px=ttl_ms), self.publish_timeout)
        self._count("meta_published")
        return True

    # ---- publishing (on the loop) ----

    def _start_publishing(self) -> None:
        self._queue = asyncio.Queue()
        self._workers = [asyncio.ensure_future(self._publisher()) for _ in range(PUBLISH_CONCURRENCY)]

    def _enqueue(self, rkey: str, data: bytes | memoryview) -> None:
        done = self._loop.create_future()
        self._publishing.setdefault(rkey, set()).add(done)
        self._queue.put_nowait((rkey, data, done))

    async def _publisher(self) -> None:
        while True:
            rkey, data, done = await self._queue.get()
            try:
                value = encode(data)
                await self._command(rkey, lambda c: c.set(rkey, value), self.publish_timeout)
                self._count("published")
                self._count("publish_bytes", len(data))
            except _Unavailable:
                self._count("publish_failed")
            except Exception:
                log.exception("cluster tier: unexpected error while publishing")
                self._count("publish_failed")
            finally:
                with self._lock:
                    self._queued_bytes -= len(data)
                pending = self._publishing[rkey]
                pending.discard(done)
                if not pending:
                    del self._publishing[rkey]
                done.set_result(None)
                self._queue.task_done()

    async def _drained(self) -> None:
        await self._queue.join()

    # ---- leases (on the loop) ----

    async def _lease(self, key: BlockKey) -> bool:
        lkey = self._keys.lease(key)
        got = await self._command(lkey, lambda c: c.set(lkey, self._token, nx=True, px=self.lease_ms), self.timeout)
        self._count("leases" if got else "lease_denied")
        return bool(got)

    async def _release(self, key: BlockKey) -> None:
        pending = self._publishing.get(self._keys.block(key))
        if pending:
            # The lease expires by itself after lease_ms: waiting longer gains nothing.
            await asyncio.wait(list(pending), timeout=self.lease_ms / 1000)
        lkey = self._keys.lease(key)
        await self._command(lkey, lambda c: c.eval(_RELEASE, 1, lkey, self._token), self.timeout)

    async def _wait(self, key: BlockKey, length: int, timeout: float) -> bytes | None:
        rkey, lkey = self._keys.block(key), self._keys.lease(key)
        deadline = self._loop.time() + timeout
        delay = WAIT_POLL_START
        while True:
            try:
                # Lease first: a block is stored before its lease goes, so "no lease" then "no block"
                # means nothing is coming.
                leased = await self._command(lkey, lambda c: c.exists(lkey), self.timeout)
                data = self._verified(rkey, await self._command(rkey, lambda c: c.get(rkey), self.timeout), length)
            except _Unavailable:
                self._count("waits_missed")
                raise
            remaining = deadline - self._loop.time()
            if data is not None or not leased or remaining <= 0:
                self._count("waits_served" if data is not None else "waits_missed")
                return data
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, WAIT_POLL_MAX)

    async def _shutdown(self) -> None:
        tasks = {*self._workers, *self._tasks, *([self._reload] if self._reload else [])}
        while tasks:
            # Again and again: Python 3.11's wait_for can swallow a cancellation that
            # arrives as its inner call completes, and a worker would then go on.
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=0.1)
        with self._lock:
            self._queued_bytes = 0
        if self._client is not None:
            await self._client.aclose()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
