"""The cluster benchmark at tiny scale: node daemons on one Redis Cluster, every byte checked.

Behaviour, not speed: at this scale timings are noise, but sharing through the
cluster tier must cut what the nodes fetch from S3.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from igtcache.bench.cluster import CONTENDERS, RATIO_FIELDS
from igtcache.bench.cluster_jobs import JOBS, workload

from .helpers import need_redis

NODES = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    need_redis()
    plot = tmp_path_factory.mktemp("plot") / "cluster.png"
    out = subprocess.run(
        [sys.executable, "-m", "igtcache.cli", "bench", "cluster", "--scale", "tiny", "--nodes", str(NODES),
         "--json", "--plot", str(plot)],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert plot.stat().st_size > 0
    return json.loads(out.stdout)


def test_every_contender_reports_every_figure(report):
    work = workload("tiny", NODES)
    assert report["distinct_bytes"] == work.distinct_bytes
    assert report["node_disk_bytes"] < report["distinct_bytes"] < report["cluster_maxmemory_bytes"] * 3
    assert [r["contender"] for r in report["results"]] == list(CONTENDERS)
    for result in report["results"]:
        for field in (*RATIO_FIELDS, "remote_bytes", "cluster_bytes", "reads", "job_seconds"):
            assert field in result, f"{result['contender']} lacks {field}"
        assert set(result["vs_node_local"]) == set(RATIO_FIELDS)
        assert set(result["job_seconds"]) == set(JOBS)
        assert len(result["nodes"]) == NODES
        assert 0 <= result["node_hit_ratio"] <= 1 and 0 <= result["cluster_hit_ratio"] <= 1
        assert ("cluster_tier_stats" in result) == result["cluster_tier"]
    assert [t["met"] for t in report["targets"]] == [t["value"] <= t["limit"] for t in report["targets"]]
    assert len(report["targets"]) == 2


def test_every_byte_of_every_read_is_checked(report):
    work = workload("tiny", NODES)
    reads = sum(len(r) for node in work.nodes for r in node.values())
    for result in report["results"]:
        assert result["reads"] == reads
        assert result["bad_reads"] == 0, f"{result['contender']} read wrong bytes"
        assert result["bytes_checked"] == result["bytes_expected"] > 0


def test_the_cluster_tier_cuts_what_the_nodes_fetch_from_s3(report):
    by_name = {r["contender"]: r for r in report["results"]}
    local = by_name["node-local"]
    assert local["cluster_bytes"] == 0
    assert local["remote_bytes"] > 2 * report["distinct_bytes"]  # each node fetches the shared data again
    for name in ("cluster-lru", "cluster-igt"):
        shared = by_name[name]
        assert shared["remote_bytes"] < local["remote_bytes"]
        assert shared["cluster_bytes"] > 0
        assert shared["cluster_tier_stats"]["published"] > 0
