"""The daemon's HTTP API (aiohttp), for curl, Prometheus and ``igtcache stats``.

On the Unix socket::

    GET  /health                               liveness, pid, remotes
    GET  /metrics                              Prometheus text
    GET  /v1/remotes                           served remotes: name, url, protocols, root
    GET  /v1/stats                             daemon counters and every remote's stats
    GET  /v1/remotes/NAME/stats
    GET  /v1/remotes/NAME/read?path=P&offset=O&size=S&job=J&hint=H   -> the bytes
    GET  /v1/remotes/NAME/info?path=P
    GET  /v1/remotes/NAME/ls?path=P
    POST /v1/remotes/NAME/invalidate?path=P
    POST /v1/remotes/NAME/prefetch?path=P&offset=O&size=S

A read's job is ``job=``, else the ``X-Igtcache-Job`` header, else the
connected process's (``igtcache.jobs.peer_job``). Reads answer with the
bytes as an ``application/octet-stream`` body, written piece by piece and
counted against the response budget until written; errors with a JSON body
``{"error": wire name, "message": text}`` and the status of the error's row
in ``igtcache.errors``.
The optional TCP listener gets only ``/health`` and ``/metrics``: it never
exposes cached data to the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Callable

from aiohttp import web
from aiohttp.web import RequestHandler

from igtcache.daemon import metrics
from igtcache.daemon.protocol import error_body
from igtcache.daemon.service import Reply, Service
from igtcache.errors import INTERNAL, BadRequest, error_row
from igtcache.jobs import peer_job

log = logging.getLogger(__name__)


def _error(exc: BaseException) -> web.Response:
    return web.Response(status=error_row(exc).status, body=error_body(exc), content_type="application/json")


def _json(value: Any) -> web.Response:
    return web.Response(body=json.dumps(value).encode(), content_type="application/json")


def _query_int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {text[:40]!r}") from None


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, aborted once a response has sat unread by the client
    for ``stall_timeout`` seconds: a client that stops reading must not hold its response's bytes
    (up to ``--max-read``) forever. aiohttp bounds the rest: no request for ``keepalive_timeout``
    seconds, a request never finished included, closes the connection. ``on_lost`` runs once
    the connection is gone (it frees the connection's slot)."""

    __slots__ = ("_stall_timeout", "_stalled", "_on_lost")

    def __init__(self, manager: web.Server, *, stall_timeout: float, on_lost: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._stall_timeout = stall_timeout
        self._stalled: asyncio.TimerHandle | None = None
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._on_lost()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stalled = self._loop.call_later(self._stall_timeout, self._abort)

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().resume_writing()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpApi:
    """Route handlers over a ``Service``; blocking cache calls run in the loop's executor."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @staticmethod
    def connections(server: web.Server, loop: asyncio.AbstractEventLoop, idle_timeout: float,
                    on_lost: Callable[[], None]) -> Callable[[], RequestHandler]:
        """A protocol factory for ``server``'s connections, each closed after ``idle_timeout`` seconds
        without a whole request or with a response left unread; ``on_lost`` runs as each one ends."""
        return lambda: _Connection(server, loop=loop, access_log=None, keepalive_timeout=idle_timeout,
                                   stall_timeout=idle_timeout, on_lost=on_lost)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 10)
        app.add_routes([
            web.get("/health", self._op("health")),
            web.get("/metrics", self.metrics),
            web.get("/v1/remotes", self._op("remotes")),
            web.get("/v1/stats", self._op("stats")),
            web.get("/v1/remotes/{remote}/stats", self._op("stats")),
            web.get("/v1/remotes/{remote}/read", self.read),
            web.get("/v1/remotes/{remote}/info", self._op("info")),
            web.get("/v1/remotes/{remote}/ls", self._op("ls")),
            web.post("/v1/remotes/{remote}/invalidate", self._op("invalidate")),
            web.post("/v1/remotes/{remote}/prefetch", self._op("prefetch")),
        ])
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 10)
        app.add_routes([web.get("/health", self._op("health")), web.get("/metrics", self.metrics)])
        return app

    async def _answer(self, op: str, call: Callable[[], Any],
                      discard: Callable[[Any], None] | None = None) -> tuple[Any, web.Response | None]:
        """Run ``call`` off the loop: ``(result, None)``, or ``(None, error response)`` for any failure.
        ``discard`` takes a result no one is left to answer with."""
        try:
            result = await _in_thread(call, discard)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
            self.service.count(op, exc)
            if error_row(exc) is INTERNAL:
                log.exception("%s failed", op)
            return None, _error(exc)
        self.service.count(op)
        return result, None

    async def read(self, request: web.Request) -> web.Response:
        q = request.query
        job = q.get("job") or request.headers.get("X-Igtcache-Job")
        transport = request.transport
        if transport is None:  # the client has already gone
            raise ConnectionResetError("the client closed the connection")
        default_job = peer_job(transport.get_extra_info("socket"))

        def call() -> Reply:
            return self.service.read(request.match_info["remote"], q.get("path", ""),
                                     _query_int(request, "offset", 0), _query_int(request, "size", -1),
                                     job, q.get("hint"), peer_job=default_job)

        reply, error = await self._answer("read", call, Reply.close)
        if error is not None:
            return error
        with reply:  # the pieces themselves, unjoined; their budget is held until the last is written
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = reply.size
            await response.prepare(request)
            for piece in reply.pieces:
                await response.write(piece)
            await response.write_eof()
        return response

    def _op(self, op: str):
        async def handler(request: web.Request) -> web.Response:
            def call() -> Any:
                args: dict[str, Any] = {"remote": request.match_info.get("remote"),
                                        "path": request.query.get("path", "")}
                if op == "prefetch":
                    args.update(offset=_query_int(request, "offset", 0), size=_query_int(request, "size", -1))
                return self.service.call(op, args)

            result, error = await self._answer(op, call)
            return _json(result) if error is None else error
        return handler

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await _in_thread(self.service.stats)
        return web.Response(text=metrics.render(stats), headers={"Content-Type": metrics.CONTENT_TYPE})



async def _in_thread(call: Callable[[], Any], discard: Callable[[Any], None] | None = None) -> Any:
    """``call()`` in a daemon thread of its own; ``discard`` gets a result whose handler is gone
    (cancelled, or the loop closed).

    Not the loop's executor: a request stuck on a hanging remote must not
    keep the daemon from exiting once its grace period is over.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: str, value: Any) -> None:
        if not future.done():
            getattr(future, outcome)(value)
        elif outcome == "set_result" and discard is not None:
            discard(value)

    def work() -> None:
        try:
            outcome, value = "set_result", call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler
            outcome, value = "set_exception", exc
        try:
            loop.call_soon_threadsafe(settle, outcome, value)
        except RuntimeError:  # the loop has closed: the daemon stopped without waiting for this request
            if outcome == "set_result" and discard is not None:
                discard(value)

    threading.Thread(target=work, name="igtcache-http", daemon=True).start()
    return await future
