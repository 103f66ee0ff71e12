"""Trace format, sizes, generator and replay."""

from __future__ import annotations

import io
import json
import random

import pytest

from igtcache.bench import gen
from igtcache.bench import replay as replay_cli
from igtcache.bench.replay import replay
from igtcache.bench.trace import TraceRow, load_trace, read_trace, write_trace
from igtcache.policies import LRU, POLICIES
from igtcache.sizes import format_size, parse_size

MiB = 1 << 20
HEADER = "ts,job,path,offset,size,object_size\n"


def parse(text: str) -> list[TraceRow]:
    return load_trace(io.StringIO(text))


def test_trace_round_trip(tmp_path):
    rows = [TraceRow(0.0, "j0", "a/b.bin", 0, 10, 100), TraceRow(0.5, "j1", "c.bin", 90, 10, 100)]
    path = tmp_path / "t.csv"
    assert write_trace(path, rows) == 2
    assert load_trace(path) == rows
    assert list(read_trace(str(path))) == rows


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("ts,job,path,offset,size\n", r":1: expected header"),
    (HEADER + "0,j,a,0,10,100\n0,j,a,0,10\n", r":3: expected 6 fields"),
    (HEADER + "0,j,a,x,10,100\n", r":2: offset must be an integer"),
    (HEADER + "nan,j,a,0,10,100\n", r":2: ts must be"),
    (HEADER + "0,j,a,0,0,100\n", r":2: size must be > 0"),
    (HEADER + "0,j,a,95,10,100\n", r":2: read \[95, 105\) goes past"),
    (HEADER + "0,j,/abs,0,10,100\n", r":2: path must be"),
    (HEADER + "1.0,j,a,0,10,100\n0.5,j,a,0,10,100\n", r":3: ts 0.5 is lower"),
])
def test_trace_reader_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("256MiB") == 256 * MiB
    assert parse_size("4 KiB") == 4096
    assert parse_size("1K") == 1024
    assert parse_size("1kb") == 1000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2TiB") == 2 << 40
    assert parse_size(7) == 7
    for bad in ("", "abc", "12XB", "-1", "-4KiB", "1e3", "4 MiB x", "MiB", "1..5M", -3):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(1536) == "1.5 KiB" and format_size(12) == "12 B"


def test_generated_trace_replays_to_json(tmp_path, capsys):
    trace = tmp_path / "shards.csv"
    assert gen.main(["shards", str(trace), "--shards", "8", "--shard-size", "8MiB", "--epochs", "2", "--seed", "3"]) == 0
    rows = load_trace(trace)
    assert len(rows) == 8 * 8 * 2 and {r.job for r in rows} == {"shards-0", "shards-1"}
    capsys.readouterr()
    plot = tmp_path / "hit.png"
    assert replay_cli.main([str(trace), "--capacity", "25%", "--capacity", "32MiB", "--policy", "lru,arc",
                            "--policy", "belady", "--block-size", "1MiB", "--json", "--plot", str(plot)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["policy"], r["capacity"]) for r in results] == [
        (p, c) for p in ("lru", "arc", "belady") for c in (16 * MiB, 32 * MiB)
    ]
    for r in results:
        for field in ("hit_ratio", "byte_hit_ratio", "remote_bytes", "wasted_prefetch_bytes", "late_prefetches"):
            assert field in r and field in r["jobs"]["shards-0"]
        assert r["remote_bytes"] >= 64 * MiB  # every block at least once
    belady, lru = results[-1], results[1]
    assert belady["hit_ratio"] >= lru["hit_ratio"]
    assert plot.stat().st_size > 0


def test_table_output_and_unknown_policy(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    write_trace(trace, [TraceRow(0.0, "j", "a", 0, 10, 100)])
    assert replay_cli.main([str(trace), "--capacity", "1MiB", "--policy", "fifo"]) == 0
    assert "fifo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        replay_cli.main([str(trace), "--capacity", "1MiB", "--policy", "nosuch,lru"])
    err = capsys.readouterr().err
    assert "'nosuch'" in err and "s3fifo" in err and "belady" in err


def test_mix_interleaves_distinct_jobs(tmp_path):
    trace = tmp_path / "mix.csv"
    assert gen.main(["mix", str(trace), "--scale", "0.002", "--of", "shards,records,loop"]) == 0
    rows = load_trace(trace)  # validates non-decreasing ts
    scenarios = [r.job.split("-")[0] for r in rows]
    assert set(scenarios) == {"shards", "records", "loop"}
    # Interleaved: the scenarios take turns rather than run one after another.
    assert sum(a != b for a, b in zip(scenarios, scenarios[1:])) > 10


def test_looping_scan_larger_than_cache_never_hits_in_lru():
    rows = list(gen.Loop(files=4, file_size=8 * MiB, loops=3, read_size=MiB).rows(random.Random(0)))
    result = replay(rows, "lru", 16 * MiB, block_size=MiB)
    assert result["reads"] == 4 * 8 * 3
    assert result["hit_ratio"] == 0.0
    assert result["remote_bytes"] == 3 * 32 * MiB


class NextBlock(LRU):
    """Test policy: prefetch the block after each read."""

    name = "next"

    def prefetch(self, access):
        return [access.last_block + 1]


def sequential(blocks: int, path: str = "f", start: float = 0.0) -> list[TraceRow]:
    return [TraceRow(start + i / 1000, "j", path, i * MiB, MiB, blocks * MiB) for i in range(blocks)]


def test_late_prefetches_under_high_latency(monkeypatch):
    monkeypatch.setitem(POLICIES, "next", NextBlock)
    rows = sequential(10)
    slow = replay(rows, "next", 100 * MiB, block_size=MiB, latency_s=1.0, bandwidth_Bps=1e9)
    assert slow["late_prefetches"] == 9 and slow["hit_ratio"] == 0.0
    assert slow["remote_bytes"] == 10 * MiB  # a late block is waited for, not fetched again
    fast = replay(rows, "next", 100 * MiB, block_size=MiB, latency_s=0.0, bandwidth_Bps=float("inf"))
    assert fast["late_prefetches"] == 0 and fast["hit_ratio"] == 0.9
    assert fast["jobs"]["j"]["hit_ratio"] == 0.9


def test_prefetched_blocks_evicted_unread_are_wasted(monkeypatch):
    monkeypatch.setitem(POLICIES, "next", NextBlock)
    rows = [TraceRow(0.0, "j", "a", 0, MiB, 2 * MiB), TraceRow(1.0, "j", "b", 0, MiB, 2 * MiB)]
    result = replay(rows, "next", MiB, block_size=MiB, latency_s=0.0)
    # a0 read, a1 prefetched (evicting a0), b0 read (evicting a1 unread), b1 prefetched.
    assert result["wasted_prefetch_bytes"] == MiB
    assert result["remote_bytes"] == 4 * MiB


def test_inference_scenario_loads_whole_adapters_beside_skewed_lookups():
    scenario = gen.Inference(jobs=2, loads=60, adapters=20, adapter_size=3 * MiB, read_size=MiB, zipf=1.2,
                             lookups=4000, table_size=16 * MiB, record_size=4096, shift_at=0.5)
    rows = list(scenario.rows(random.Random(1)))
    assert [r.ts for r in rows] == sorted(r.ts for r in rows)
    serving = [r for r in rows if "-serve-" in r.job]
    lookups = [r for r in rows if "-embed-" in r.job]
    assert len(serving) == 60 * 3 and len(lookups) == 4000
    for load in range(0, len(serving), 3):  # each server's loads read front to back, whole
        per_job = sorted((r for r in serving if r.job == serving[load].job), key=lambda r: r.ts)
        assert all(r.offset == (i % 3) * MiB and r.size == MiB for i, r in enumerate(per_job))
    loads = [r.path for r in serving if r.offset == 0]
    top = max(set(loads), key=loads.count)
    assert loads.count(top) > 3 * len(loads) / 20  # skewed choice
    assert all(r.size == 4096 and r.object_size == 16 * MiB for r in lookups)
    # The hot set moves once, half way: the most read block before it is seldom read after.
    blocks = [r.offset // MiB for r in lookups]
    before, after = blocks[:2000], blocks[2000:]
    hot = max(set(before), key=before.count)
    assert before.count(hot) > 4 * after.count(hot)
    assert lookups[-1].ts <= serving[-1].ts


def test_inference_is_a_gen_command_left_out_of_mix(tmp_path):
    trace = tmp_path / "inf.csv"
    assert gen.main(["inference", str(trace), "--scale", "0.01", "--adapters", "50", "--zipf", "1.4",
                     "--table-size", "64MiB"]) == 0
    assert {r.job.split("-")[1] for r in load_trace(trace)} == {"serve", "embed"}
    assert "inference" not in gen.SCENARIOS


def test_stall_and_completion_time_count_waits_for_the_remote():
    rows = [TraceRow(0.0, "j", "a", 0, MiB, MiB), TraceRow(1.0, "j", "a", 0, MiB, MiB)]
    result = replay(rows, "lru", 4 * MiB, block_size=MiB, latency_s=0.1, bandwidth_Bps=MiB / 0.05)
    assert result["stall_s"] == pytest.approx(0.15)  # the first read waits for its block; the second hits
    assert result["completion_s"] == pytest.approx(1.15)
    assert result["jobs"]["j"]["stall_s"] == pytest.approx(0.15)


def test_demand_fetches_overtake_readahead_on_the_link(monkeypatch):
    """A scan's readahead queued on a slow link does not delay another job's miss."""
    monkeypatch.setitem(POLICIES, "deep", DeepAhead)
    rows = [TraceRow(0.0, "scan", "s", 0, MiB, 64 * MiB), TraceRow(0.001, "other", "o", 0, MiB, MiB)]
    first, fifo = (replay(rows, "deep", 128 * MiB, block_size=MiB, latency_s=0.02, bandwidth_Bps=100 * MiB,
                          demand_first=order) for order in (True, False))
    assert first["jobs"]["other"]["stall_s"] < 0.05  # behind the one transfer under way
    assert fifo["jobs"]["other"]["stall_s"] > 0.3  # behind 32 blocks of readahead
    assert first["remote_bytes"] == fifo["remote_bytes"]


class DeepAhead(LRU):
    """Test policy: prefetch the next 32 blocks after each read."""

    name = "deep"

    def prefetch(self, access):
        return list(range(access.last_block + 1, min(access.last_block + 33, -(-access.object_size // MiB))))
