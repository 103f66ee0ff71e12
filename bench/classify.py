"""Benchmark of the pattern classifier and the AccessStreamTree.

Prints, in one run:

1. the confusion matrix and accuracy of :func:`igtcache.patterns.classify` on
   labelled synthetic streams (igtcache.bench.streams) of each length;
2. how many accesses the tree takes to relabel a stream after a phase change;
3. the amortized cost of ``AccessStreamTree.record()`` over a mixed cluster
   workload, next to a bare dict update over the same accesses, and the
   tree's node count and peak memory (tracemalloc) against its bounds.

Run ``python -m igtcache.bench.classify --help`` for the options.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections import Counter

import numpy as np

from igtcache.bench.streams import KINDS, cluster_workload, corpus, phase_change
from igtcache.patterns import Pattern, classify
from igtcache.stream_tree import AccessStreamTree

LABELS = (Pattern.SEQUENTIAL, Pattern.RANDOM, Pattern.SKEWED)
PREDICTED = LABELS + (Pattern.UNKNOWN,)
#: (first kind, second kind) of the phase changes measured.
PHASES = (
    ("sequential", "uniform"),
    ("uniform", "sequential"),
    ("uniform", "hotset"),
    ("hotset", "uniform"),
    ("epoch", "zipf"),
)
#: Accuracy targets by stream length.
TARGETS = {64: 0.90, 256: 0.97}
RECORD_TARGET_US = 10.0


def accuracy_section(lengths: list[int], per_kind: int, seed: int,
                     alpha: float) -> dict[int, float]:
    """Print a confusion matrix per length; return the accuracy per length."""
    print(f"classify() on labelled streams: {per_kind} per kind x {len(KINDS)} kinds, "
          f"alpha={alpha}, seed={seed}")
    result = {}
    for length in lengths:
        streams = corpus(length, per_kind, seed)
        start = time.perf_counter()
        predicted = [classify(s.items, alpha) for s in streams]
        cost = (time.perf_counter() - start) / len(streams) * 1e6
        matrix = Counter((s.label, p) for s, p in zip(streams, predicted))
        by_kind = Counter(s.kind for s, p in zip(streams, predicted) if p is s.label)
        result[length] = sum(by_kind.values()) / len(streams)
        print(f"\n  {length} accesses: accuracy {100 * result[length]:.1f}% "
              f"({len(streams)} streams, {cost:.0f} us per classify)")
        print("    true \\ predicted " + "".join(f"{p.value:>12}" for p in PREDICTED))
        for truth in LABELS:
            print(f"    {truth.value:<18}" + "".join(f"{matrix[truth, p]:>12}" for p in PREDICTED))
        print("    per kind: "
              + "  ".join(f"{k} {100 * by_kind[k] / per_kind:.1f}%" for k in KINDS))
    return result


def adaptation_section(window: int, seed: int, alpha: float, trials: int = 10) -> None:
    """Print accesses from a phase change until the tree's file label follows it."""
    length = 4 * window
    print(f"\nRelabel after a phase change (one file, window={window}, "
          f"{length} accesses per phase, {trials} seeds): accesses after the change")
    rng = np.random.default_rng(seed)
    for first, second in PHASES:
        delays = []
        for _ in range(trials):
            tree = AccessStreamTree(window=window, alpha=alpha)
            stream = phase_change(first, second, length, rng)
            expected = stream.label
            delay = None
            for i, item in enumerate(stream.items.tolist()):
                tree.record("f", item * tree.block_size, 4096, job="j", ts=float(i))
                if i >= length and delay is None and tree.pattern("f", "j") is expected:
                    delay = i - length + 1
            delays.append(delay)
        done = [d for d in delays if d is not None]
        summary = (f"median {int(np.median(done))}, max {max(done)}" if done else "never")
        missed = f", {len(delays) - len(done)} never" if len(done) < len(delays) else ""
        print(f"  {first:>10} -> {second:<10} ({expected.value}): {summary}{missed}")


def tree_section(accesses: int, files: int, seed: int, max_nodes: int, window: int,
                 alpha: float) -> float:
    """Print record() cost, node count and peak memory; return record() us per access."""
    print(f"\nAccessStreamTree.record() over {accesses:,} accesses to {files:,} files "
          f"(max_nodes={max_nodes:,}, window={window}, seed={seed})")
    start = time.perf_counter()
    work = [(p, o, s, j, i * 1e-4) for i, (p, o, s, j) in
            enumerate(cluster_workload(accesses, files, seed))]
    print(f"  workload generated in {time.perf_counter() - start:.1f} s "
          f"({len({w[0] for w in work}):,} distinct files)")

    tree = AccessStreamTree(max_nodes=max_nodes, window=window, alpha=alpha)
    record = tree.record
    start = time.perf_counter()
    for path, offset, size, job, ts in work:
        record(path, offset, size, job, ts)
    tree_us = (time.perf_counter() - start) / accesses * 1e6
    counts: dict = {}
    start = time.perf_counter()
    for path, offset, size, job, ts in work:
        counts[path] = counts.get(path, 0) + 1
    dict_us = (time.perf_counter() - start) / accesses * 1e6
    print(f"  record():          {tree_us:6.2f} us per access (amortized, classification included)")
    print(f"  bare dict update:  {dict_us:6.2f} us per access (same loop)")
    labels = Counter((s["level"], s["label"]) for s in tree.streams())
    print(f"  nodes {len(tree):,} (max {max_nodes:,}); classified streams by level/label: "
          + ", ".join(f"{lv}/{lb} {n}" for (lv, lb), n in sorted(labels.items())))

    tree = AccessStreamTree(max_nodes=max_nodes, window=window, alpha=alpha)
    record = tree.record
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    checkpoints = []
    for i, (path, offset, size, job, ts) in enumerate(work, 1):
        record(path, offset, size, job, ts)
        if i % (accesses // 4 or 1) == 0:
            checkpoints.append((i, tracemalloc.get_traced_memory()[0] - base, len(tree)))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    print("  tree memory after " + ", ".join(
        f"{i:,}: {b / 2**20:.1f} MiB/{n:,} nodes" for i, b, n in checkpoints))
    print(f"  peak memory of the tree (tracemalloc): {peak / 2**20:.1f} MiB")
    return tree_us


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; with ``--check``, exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(
        prog="igtcache bench classify",
        description="Accuracy of the access-pattern classifier on labelled synthetic streams, "
                    "relabel delay after phase changes, and the cost and memory of "
                    "AccessStreamTree.record() over a mixed cluster workload.",
    )
    parser.add_argument("--lengths", default="32,64,256,1024",
                        help="stream lengths (accesses) to score, comma-separated "
                             "(default: %(default)s)")
    parser.add_argument("--per-kind", type=int, default=200,
                        help="labelled streams per kind and length (default: %(default)s)")
    parser.add_argument("--accesses", type=int, default=1_000_000,
                        help="accesses replayed into the tree (default: %(default)s)")
    parser.add_argument("--files", type=int, default=100_000,
                        help="distinct files in the tree workload (default: %(default)s)")
    parser.add_argument("--max-nodes", type=int, default=32_768,
                        help="node bound of the tree under test (default: %(default)s)")
    parser.add_argument("--window", type=int, default=256,
                        help="visits kept per stream (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="significance level of the tests (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a target is missed (accuracy "
                             + " and ".join(f">= {100 * t:g}%% at {n}" for n, t in TARGETS.items())
                             + f", record() <= {RECORD_TARGET_US:g} us)")
    args = parser.parse_args(argv)
    lengths = [int(v) for v in args.lengths.split(",") if v]

    accuracy = accuracy_section(lengths, args.per_kind, args.seed, args.alpha)
    adaptation_section(args.window, args.seed, args.alpha)
    record_us = tree_section(args.accesses, args.files, args.seed, args.max_nodes,
                             args.window, args.alpha)

    missed = [f"accuracy at {n} = {accuracy[n]:.1%} < {t:.0%}"
              for n, t in TARGETS.items() if n in accuracy and accuracy[n] < t]
    if record_us > RECORD_TARGET_US:
        missed.append(f"record() {record_us:.2f} us > {RECORD_TARGET_US:g} us")
    print("\ntargets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
