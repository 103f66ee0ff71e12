"""The replay's remote link: demand fetches before readahead, one transfer at a time."""

from __future__ import annotations

import pytest

from igtcache.bench.link import PriorityLink
from igtcache.bench.replay import RemoteLink

MB = 1_000_000


def arrivals(link: PriorityLink, until: float = float("inf")) -> dict[str, float]:
    return {token: round(t, 9) for t, token in link.run_until(until)}


def test_demand_goes_before_queued_readahead():
    link = PriorityLink(0.01, 100 * MB)  # 10 ms per MB on the wire, 10 ms latency
    for name in ("r1", "r2", "r3"):
        link.submit(0.0, name, MB, demand=False)
    assert arrivals(link, 0.005) == {"r1": 0.02}  # started at 0, not preempted
    link.submit(0.005, "d", MB, demand=True)
    # d takes the link when r1 frees it, ahead of r2 and r3, which were issued first.
    assert arrivals(link) == {"d": 0.03, "r2": 0.04, "r3": 0.05}


def test_readahead_uses_the_link_while_no_demand_is_waiting():
    link = PriorityLink(0.0, 100 * MB)
    link.submit(0.0, "r", MB, demand=False)
    link.submit(0.5, "d", MB, demand=True)
    assert arrivals(link) == {"r": 0.01, "d": 0.51}


def test_readahead_is_held_back_at_most_its_slack():
    link = PriorityLink(0.0, 100 * MB, slack_s=0.2)
    link.submit(0.0, "big", 100 * MB, demand=True)  # the link is busy until 1.0
    link.submit(0.1, "r", MB, demand=False)  # due at 0.3
    link.submit(0.5, "d", MB, demand=True)  # due at 0.5: issued past r's slack, it waits its turn
    assert list(arrivals(link)) == ["big", "r", "d"]
    strict = PriorityLink(0.0, 100 * MB, slack_s=float("inf"))
    strict.submit(0.0, "big", 100 * MB, demand=True)
    strict.submit(0.1, "r", MB, demand=False)
    strict.submit(0.5, "d", MB, demand=True)
    assert list(arrivals(strict)) == ["big", "d", "r"]


def test_a_read_waiting_on_queued_readahead_promotes_it():
    link = PriorityLink(0.0, 100 * MB)
    for name in ("r1", "r2", "r3"):
        link.submit(0.0, name, MB, demand=False)
    link.submit(0.0, "d", MB, demand=True)
    link.promote("r3")
    assert list(arrivals(link)) == ["r3", "d", "r1", "r2"]  # among demand fetches in issue order
    link.promote("gone")  # started or never queued: nothing to do


def test_fifo_mode_matches_the_plain_fifo_link():
    plain, fifo = RemoteLink(0.02, 50 * MB), PriorityLink(0.02, 50 * MB, demand_first=False)
    issues = [(0.0, 4 * MB, False), (0.01, MB, True), (0.05, 2 * MB, False), (0.3, MB, True)]
    expected = {n: round(plain.fetch(ts, size), 9) for n, (ts, size, _) in enumerate(issues)}
    for n, (ts, size, demand) in enumerate(issues):
        fifo.submit(ts, n, size, demand=demand)
    assert arrivals(fifo) == expected


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        PriorityLink(-1, MB)
    with pytest.raises(ValueError):
        PriorityLink(0.0, 0)
