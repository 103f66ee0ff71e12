"""Cluster traces: one CSV for every node, the node named in each row's ``job``.

A cluster trace is an ordinary trace (:mod:`igtcache.bench.trace`) whose
``job`` column reads ``nodeK/JOBNAME``: the read was made by job ``JOBNAME``
on node ``K`` (0-based). Rows stay in one file, ordered by ``ts`` across all
nodes, so the replay merges the nodes by time by reading the file in order.
Job names stay whole in the replay's per-job figures (``node3/train-0``).
"""

from __future__ import annotations

import re
from typing import Iterable

from igtcache.bench.trace import TraceRow

_NODE_JOB = re.compile(r"node(\d+)/.+")


def node_job(node: int, job: str) -> str:
    """The ``job`` column for job ``job`` on node ``node``."""
    return f"node{node}/{job}"


def node_of(job: str) -> int:
    """The node a cluster trace's ``job`` names; ``ValueError`` when it names none."""
    match = _NODE_JOB.fullmatch(job)
    if match is None:
        raise ValueError(f"job {job!r} names no node: a cluster trace's jobs read nodeK/JOBNAME")
    return int(match.group(1))


def split_by_node(rows: Iterable[TraceRow], nodes: int | None = None) -> list[list[TraceRow]]:
    """Each node's rows, in trace order. ``nodes``: how many the cluster has (default: the
    highest node named, plus one); a row naming a node past it is a ``ValueError``."""
    by_node: dict[int, list[TraceRow]] = {}
    for row in rows:
        by_node.setdefault(node_of(row.job), []).append(row)
    count = max(by_node, default=-1) + 1 if nodes is None else nodes
    if count < 1:
        raise ValueError("the trace has no rows and no node count was given")
    if by_node and max(by_node) >= count:
        raise ValueError(f"the trace names node{max(by_node)} but the cluster has {count} nodes "
                         f"(node0..node{count - 1})")
    return [by_node.get(k, []) for k in range(count)]
