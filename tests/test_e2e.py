"""The end-to-end benchmark at tiny scale: every contender's jobs finish with byte-correct reads.

Behaviour, not speed: timings at this scale are noise.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

from igtcache.bench.e2e import contender_unusable, mix
from igtcache.bench.e2e_jobs import CONTENDERS
from igtcache.bench.shaping_proxy import ShapingProxy


def test_tiny_mix_runs_every_contender_with_correct_reads(tmp_path):
    plot = tmp_path / "e2e.png"
    out = subprocess.run(
        [sys.executable, "-m", "igtcache.cli", "bench", "e2e", "--scale", "tiny", "--json", "--plot", str(plot)],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    scenario = mix("tiny")
    assert report["capacity_bytes"] == int(0.2 * scenario.total_bytes)
    expected = [c for c in CONTENDERS if contender_unusable(c) is None]
    assert [r["contender"] for r in report["results"]] == expected
    for result in report["results"]:
        assert list(result["jobs"]) == list(scenario.jobs)
        for name, job in result["jobs"].items():
            assert job["error"] is None
            assert job["reads"] == len(scenario.jobs[name])
            assert job["bytes"] == sum(scenario.sizes[key] for key, _ in scenario.jobs[name])
            assert job["bad"] == 0, f"{result['contender']}/{name} read wrong bytes"
            assert 0 < job["seconds"] <= result["makespan_s"]
        if result["contender"].startswith("igtcache"):
            total_reads = sum(len(reads) for reads in scenario.jobs.values())
            assert result["live"]["reads"] >= total_reads
            assert result["replayed"]["reads"] == result["live"]["reads"]
            for ratios in (result["live"], result["replayed"]):
                assert 0 <= ratios["hit_ratio"] <= 1
                assert set(ratios["jobs"]) == set(scenario.jobs)
    assert set(report["summary"]) == {"igt_vs_best_fsspec", "igt_vs_lru", "jobs_igt_vs_lru"}
    assert plot.stat().st_size > 0


def test_shaping_proxy_adds_latency_per_request_and_caps_bandwidth():
    payload = b"x" * 200_000
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:  # answers each 4-byte request with the payload
        conn, _ = listener.accept()
        with conn:
            while conn.recv(4):
                conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    proxy = ShapingProxy("127.0.0.1", listener.getsockname()[1], latency_s=0.05, bandwidth_Bps=2e6).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            started = time.monotonic()
            for _ in range(2):
                client.sendall(b"ping")
                received = 0
                while received < len(payload):
                    received += len(client.recv(1 << 16))
            elapsed = time.monotonic() - started
        # two requests: 2 x 50 ms latency + 400 kB at 2 MB/s = 0.3 s at least
        assert elapsed >= 0.28
        assert proxy.requests == 2
    finally:
        proxy.stop()
        listener.close()
