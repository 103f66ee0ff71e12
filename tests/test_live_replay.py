"""The live cache and the trace replay run one read driver: replaying a live
run's trace over a link with the live remote's latency reproduces its hit
ratios, per job, under IGT with readahead.

The remote is the moto S3 server behind the shaping proxy (a slow link). Each
job reads on a 50 ms grid and the link takes about 180 ms, so every arrival
falls between two grid points by a margin wider than the timing noise, and
live and replay see arrivals and reads in the same order.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from igtcache import Cache
from igtcache.bench.replay import replay
from igtcache.bench.shaping_proxy import ShapingProxy
from igtcache.bench.trace import load_trace

KiB = 1024
BLOCK = 64 * KiB
GRID_S = 0.05
LATENCY_S = 0.175


def _on_grid(started: float, job_reads) -> None:
    """Run each read of a job at the next free point of the grid after the previous one ended."""
    for read in job_reads:
        now = time.monotonic() - started
        time.sleep((int(now / GRID_S) + 1) * GRID_S - now)
        read()


@pytest.fixture
def slow_s3(s3_server, s3):
    fs, prefix = s3
    proxy = ShapingProxy("127.0.0.1", s3_server.port, latency_s=LATENCY_S, bandwidth_Bps=1e9).start()
    yield s3_server.filesystem(client_kwargs={"endpoint_url": proxy.endpoint, "region_name": "us-east-1"}), fs, prefix
    proxy.stop()


def test_replay_of_a_live_trace_matches_live_hit_ratios_per_job(slow_s3, tmp_path):
    slow_fs, fs, prefix = slow_s3
    rng = random.Random(5)
    scans = {f"scan/part-{i}.bin": rng.randbytes(32 * BLOCK) for i in range(3)}
    hot = {f"hot/obj-{i}.bin": rng.randbytes(BLOCK) for i in range(12)}
    for path, data in {**scans, **hot}.items():
        fs.pipe_file(f"{prefix}/{path}", data)
    names = list(hot)
    hot_picks = rng.choices(names, weights=[1 / (r + 1) for r in range(len(names))], k=90)
    trace = tmp_path / "live.csv"
    capacity = 48 * BLOCK
    cache = Cache(slow_fs, root=prefix, memory_bytes=capacity, block_size=BLOCK, policy="igt",
                  ttl=600, trace_path=trace)
    wrong = []

    def reader(job, path, offset, size, expected):
        def read():
            if cache.read(path, offset, size, job=job) != expected[offset:offset + size]:
                wrong.append((job, path, offset))
        return read

    scan_reads = [reader("scan", path, off, 32 * KiB, data)
                  for path, data in scans.items() for off in range(0, len(data), 32 * KiB)]
    hot_reads = [reader("hot", path, 0, BLOCK, hot[path]) for path in hot_picks]
    for path in hot:  # metadata first, so no stat lands inside the measured run
        cache.info(path)
    for path in scans:
        cache.info(path)
    started = time.monotonic()
    jobs = [threading.Thread(target=_on_grid, args=(started, reads)) for reads in (scan_reads, hot_reads)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    cache.flush()
    cache.check_invariants()
    live = cache.stats()
    cache.close()
    assert not wrong

    replayed = replay(load_trace(trace), "igt", capacity, BLOCK, latency_s=LATENCY_S, bandwidth_Bps=1e9)
    for job in ("scan", "hot"):
        live_job, replay_job = live["jobs"][job], replayed["jobs"][job]
        assert replay_job["reads"] == live_job["reads"]
        assert abs(replay_job["hit_ratio"] - live_job["hit_ratio"]) <= 0.01, (job, live_job, replay_job)
        assert abs(replay_job["byte_hit_ratio"] - live_job["byte_hit_ratio"]) <= 0.01, (job, live_job, replay_job)
    assert live["prefetch"]["issued"] > 0  # readahead was part of the run
    assert live["jobs"]["scan"]["hit_ratio"] > 0.5
