"""Demand before readahead on the live remote link (igtcache.fetch_sources)."""

from __future__ import annotations

import concurrent.futures

import fsspec
import pytest

from igtcache.fetch_sources import REMOTE, DemandFirst, RemoteSource
from igtcache.policies import BlockKey
from igtcache.remote import Remote


class Starts:
    """Fetch starters whose futures the test completes by hand; records the order they start in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.futures: dict[str, concurrent.futures.Future] = {}

    def __call__(self, name: str):
        def start() -> concurrent.futures.Future:
            self.started.append(name)
            future = self.futures[name] = concurrent.futures.Future()
            return future
        return start

    def finish(self, name: str, value: bytes = b"x") -> None:
        self.futures[name].set_result(value)


def test_readahead_waits_for_a_free_slot_and_demand_never_waits():
    order, starts = DemandFirst(slots=2), Starts()
    ahead = {n: order.submit(n, starts(n), readahead=True) for n in ("r1", "r2", "r3", "r4")}
    assert starts.started == ["r1", "r2"]
    demand = order.submit("d", starts("d"), readahead=False)
    assert starts.started == ["r1", "r2", "d"]  # at once, past the slots
    starts.finish("r1")
    assert ahead["r1"].result(timeout=1) == b"x"
    assert starts.started == ["r1", "r2", "d"]  # d still holds a slot: r3 waits
    starts.finish("d")
    starts.finish("r2")
    assert starts.started == ["r1", "r2", "d", "r3", "r4"]  # in issue order
    assert demand.result(timeout=1) == b"x" and order.queued() == 0


def test_a_waiting_read_promotes_queued_readahead():
    order, starts = DemandFirst(slots=1), Starts()
    order.submit("r1", starts("r1"), readahead=True)
    order.submit("r2", starts("r2"), readahead=True)
    waited = order.submit("r3", starts("r3"), readahead=True)
    order.promote("r3")
    assert starts.started == ["r1", "r3"]
    order.promote("r1")  # already running: nothing to do
    starts.finish("r3", b"y")
    assert waited.result(timeout=1) == b"y"
    starts.finish("r1")
    assert starts.started == ["r1", "r3", "r2"]


def test_a_failed_fetch_frees_its_slot():
    order, starts = DemandFirst(slots=1), Starts()
    first = order.submit("a", starts("a"), readahead=True)
    second = order.submit("b", starts("b"), readahead=True)
    starts.futures["a"].set_exception(OSError("boom"))
    with pytest.raises(OSError):
        first.result(timeout=1)
    starts.finish("b")
    assert second.result(timeout=1) == b"x"


def test_remote_source_fetches_through_the_order():
    fs = fsspec.filesystem("memory")
    fs.pipe("/fetch-order/obj", b"0123456789")
    remote = Remote(fs, "/fetch-order")
    try:
        version = remote.info("obj").version
        source = RemoteSource(remote, slots=1)
        keys = [BlockKey("obj", version, i) for i in range(3)]
        futures = [source.fetch(k, 2 * i, 2 * i + 2, readahead=True) for i, k in enumerate(keys)]
        source.promote(keys[2])
        got = [f.result(timeout=5) for f in futures]
        assert [g.data for g in got] == [b"01", b"23", b"45"] and {g.source for g in got} == {REMOTE}
        assert source.order.running == 0
    finally:
        remote.close()
