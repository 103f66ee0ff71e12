"""A latency and bandwidth shaping TCP proxy on 127.0.0.1 (asyncio, in a thread).

Kernel traffic shaping (tc netem) is not available on these machines, so the
end-to-end benchmark puts this proxy between the clients and the S3 server:
every HTTP request waits ``latency_s`` before its first byte is forwarded,
and the bytes the server sends back share one ``bandwidth_Bps`` cap across all
connections, as a cluster's link to object storage would.
"""

from __future__ import annotations

import asyncio
import threading
import time

from igtcache.local_s3 import free_port

DEFAULT_LATENCY_S = 0.020
DEFAULT_BANDWIDTH_BPS = 100e6
CHUNK = 64 * 1024


class _Link:
    """A shared bandwidth cap: each chunk is scheduled after the previous one has drained."""

    def __init__(self, bandwidth_Bps: float) -> None:
        self.bandwidth_Bps = bandwidth_Bps
        self._free_at = 0.0

    async def send(self, nbytes: int) -> None:
        now = time.monotonic()
        self._free_at = max(now, self._free_at) + nbytes / self.bandwidth_Bps
        await asyncio.sleep(self._free_at - now)


class ShapingProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` with added latency and a bandwidth cap.

    ``start()`` runs it in a daemon thread; ``stop()`` ends it. ``endpoint`` is
    the URL clients should use instead of the server's.
    """

    def __init__(self, target_host: str, target_port: int, latency_s: float = DEFAULT_LATENCY_S,
                 bandwidth_Bps: float = DEFAULT_BANDWIDTH_BPS, port: int | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.latency_s = latency_s
        self.bandwidth_Bps = bandwidth_Bps
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> "ShapingProxy":
        self._thread = threading.Thread(target=self._run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("shaping proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._cancel_connections(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    @staticmethod
    async def _cancel_connections() -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        link = _Link(self.bandwidth_Bps)
        server = self._loop.run_until_complete(
            asyncio.start_server(lambda r, w: self._connection(r, w, link), "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, link: _Link) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.close()
            return
        awaiting_request = [True]  # the next client bytes start a new request

        async def upstream() -> None:
            while data := await client_r.read(CHUNK):
                if awaiting_request[0]:
                    awaiting_request[0] = False
                    self.requests += 1
                    await asyncio.sleep(self.latency_s)
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(CHUNK):
                awaiting_request[0] = True
                await link.send(len(data))
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a reset connection just ends
        for writer in (server_w, client_w):
            writer.close()
