"""Labelled synthetic access streams for the classifier (igtcache.bench.streams).

Each generator returns item ids (block numbers, or file ordinals) in access
order together with the label a correct classifier should give:

=============  ==========  ====================================================
kind           label       stream
=============  ==========  ====================================================
sequential     sequential  a scan with a stride of 1-8, random small gaps,
                           re-reads of the current and previous block, and a
                           restart from the top when the file ends
interleaved    sequential  2 or 3 such scans in distant parts of one file,
                           interleaved at random
epoch          random      successive random permutations of 32-4096 items
uniform        random      independent uniform draws (with replacement) over
                           64-100,000 items
zipf           skewed      Zipf draws, exponent 0.7-1.4, over 1,000-100,000
                           items; the hot items scattered or at the front
hotset         skewed      4-64 hot items drawn 70-95% of the time, else
                           uniform over 1,000-100,000 items
=============  ==========  ====================================================

:func:`phase_change` joins two kinds to test adaptation, and
:func:`cluster_workload` makes a mixed workload of whole reads (path, offset,
size, job) of four jobs for the AccessStreamTree. Everything is driven by a
seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from igtcache.patterns import Pattern


@dataclass(frozen=True)
class LabelledStream:
    """Item ids in access order with the generator's kind, label and parameters."""

    kind: str
    label: Pattern
    items: np.ndarray
    params: dict = field(default_factory=dict)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> int:
    return int(round(float(np.exp(rng.uniform(np.log(lo), np.log(hi))))))


def _scan(length: int, rng: np.random.Generator, start: int, size: int, stride: int,
          p_gap: float, p_reread: float, p_back: float) -> np.ndarray:
    """A scan of ``size`` blocks from ``start``, restarting at the top when it ends."""
    out = np.empty(length, dtype=np.int64)
    pos, prev = 0, 0
    for i in range(length):
        u = rng.random()
        if i and u < p_reread:
            item = start + prev  # the block the last read ended in, read again
        elif i and u < p_reread + p_back and prev >= stride:
            item = start + prev - stride  # one block back
        else:
            item = start + pos
            prev = pos
            pos += stride * (1 + (int(rng.integers(1, 4)) if rng.random() < p_gap else 0))
            if pos >= size:
                pos = 0
        out[i] = item
    return out


def _scan_params(rng: np.random.Generator, length: int) -> dict:
    return dict(
        stride=int(rng.choice([1, 1, 1, 2, 3, 4, 8])),
        size=_log_uniform(rng, max(8, length // 4), 8 * length),
        p_gap=float(rng.uniform(0.0, 0.1)),
        p_reread=float(rng.uniform(0.0, 0.3)),
        p_back=float(rng.uniform(0.0, 0.05)),
    )


def sequential(length: int, rng: np.random.Generator) -> LabelledStream:
    """One scan with strides, small gaps and re-reads."""
    params = _scan_params(rng, length)
    params["size"] *= params["stride"]
    start = int(rng.integers(0, 1 << 20))
    items = _scan(length, rng, start, **params)
    return LabelledStream("sequential", Pattern.SEQUENTIAL, items, params)


def interleaved(length: int, rng: np.random.Generator) -> LabelledStream:
    """2-3 scans in distant places of one file, interleaved at random."""
    k = int(rng.integers(2, 4))
    params = _scan_params(rng, length)
    params["size"] *= params["stride"]
    scans = [_scan(length, rng, j * (params["size"] + 1000), **params) for j in range(k)]
    who = rng.integers(0, k, size=length)
    cursor = [0] * k
    items = np.empty(length, dtype=np.int64)
    for i, j in enumerate(who):
        items[i] = scans[j][cursor[j]]
        cursor[j] += 1
    return LabelledStream("interleaved", Pattern.SEQUENTIAL, items, dict(params, scans=k))


def epoch(length: int, rng: np.random.Generator) -> LabelledStream:
    """Random permutations of ``n`` items, one after another (shuffled epochs)."""
    n = _log_uniform(rng, 32, 4096)
    base = int(rng.integers(0, 1 << 20))
    perms = [rng.permutation(n) for _ in range(-(-length // n))]
    items = base + np.concatenate(perms)[:length]
    return LabelledStream("epoch", Pattern.RANDOM, items, dict(n=n))


def uniform(length: int, rng: np.random.Generator) -> LabelledStream:
    """Independent uniform draws over ``n`` items."""
    n = _log_uniform(rng, 64, 100_000)
    base = int(rng.integers(0, 1 << 20))
    items = base + rng.integers(0, n, size=length)
    return LabelledStream("uniform", Pattern.RANDOM, items, dict(n=n))


def zipf(length: int, rng: np.random.Generator, alpha: float | None = None,
         n: int | None = None) -> LabelledStream:
    """Zipf(``alpha``) draws over ``n`` items; hot items scattered or at the front."""
    alpha = float(rng.uniform(0.7, 1.4)) if alpha is None else alpha
    n = _log_uniform(rng, 1000, 100_000) if n is None else n
    weights = np.arange(1, n + 1, dtype=float) ** -alpha
    ranks = rng.choice(n, size=length, p=weights / weights.sum())
    scattered = bool(rng.random() < 0.5)
    ids = rng.permutation(n)[ranks] if scattered else ranks
    return LabelledStream("zipf", Pattern.SKEWED, ids.astype(np.int64),
                          dict(alpha=alpha, n=n, scattered=scattered))


def hotset(length: int, rng: np.random.Generator, hot: int | None = None,
           n: int | None = None) -> LabelledStream:
    """``hot`` items drawn with probability 0.7-0.95, else uniform over ``n``."""
    hot = int(rng.integers(4, 65)) if hot is None else hot
    n = _log_uniform(rng, 1000, 100_000) if n is None else n
    share = float(rng.uniform(0.7, 0.95))
    hot_items = rng.choice(n, size=hot, replace=False)
    items = np.where(rng.random(length) < share,
                     hot_items[rng.integers(0, hot, size=length)],
                     rng.integers(0, n, size=length))
    return LabelledStream("hotset", Pattern.SKEWED, items.astype(np.int64),
                          dict(hot=hot, n=n, share=share))


#: Generator of each kind, in the order the benchmark reports them.
KINDS: dict[str, Callable[[int, np.random.Generator], LabelledStream]] = {
    "sequential": sequential,
    "interleaved": interleaved,
    "epoch": epoch,
    "uniform": uniform,
    "zipf": zipf,
    "hotset": hotset,
}


def corpus(length: int, per_kind: int, seed: int = 0) -> list[LabelledStream]:
    """``per_kind`` streams of ``length`` accesses of every kind, fixed by ``seed``."""
    rng = np.random.default_rng([seed, length])
    return [KINDS[kind](length, rng) for kind in KINDS for _ in range(per_kind)]


def phase_change(first: str, second: str, length: int, rng: np.random.Generator) -> LabelledStream:
    """``length`` accesses of kind ``first``, then ``length`` of kind ``second``.

    Labelled as the second phase; ``params["change_at"]`` is ``length``. The
    phases use disjoint item ranges, so a hot set moves when both are skewed.
    """
    a = KINDS[first](length, rng).items
    b = KINDS[second](length, rng)
    items = np.concatenate([a, b.items - int(b.items.min()) + int(a.max()) + 1000])
    return LabelledStream(f"{first}->{second}", b.label, items, dict(change_at=length))


def cluster_workload(accesses: int, files: int = 100_000,
                     seed: int = 0) -> Iterator[tuple[str, int, int, str]]:
    """``accesses`` reads ``(path, offset, size, job)`` of four jobs over ``files`` files.

    * ``train`` (40% of reads): 80% of the files, 800 per shard directory,
      60% of one 4 MiB block and the rest of 2-4, read front to back in
      4 MiB reads, the files in a new shuffled order every epoch;
    * ``tokens`` (30%): 64 files of 2 GiB, 8 workers each scanning one in
      1 MiB reads, round robin;
    * ``embed`` (20%): one 64 GiB table read at Zipf(1.1) blocks, 64 KiB reads;
    * ``eval`` (10%): the other 20% of the files, 4 blocks each, in name order.
    """
    rng = np.random.default_rng(seed)
    block, mib = 4 << 20, 1 << 20
    n_train = files * 4 // 5
    train = [f"train/shard-{i // 800:04d}/clip-{i:07d}.bin" for i in range(n_train)]
    train_blocks = np.where(rng.random(n_train) < 0.6, 1, rng.integers(2, 5, size=n_train))
    evals = [f"eval/part-{i // 1000:03d}/clip-{i:06d}.bin" for i in range(files - n_train)]

    def train_reads():
        while True:
            for k in rng.permutation(n_train).tolist():
                for b in range(int(train_blocks[k])):
                    yield train[k], b * block, block

    def token_reads():
        names = [f"tokens/part-{k:05d}.bin" for k in range(64)]
        current, pos, worker = list(range(8)), [0] * 8, 0
        while True:
            yield names[current[worker] % 64], pos[worker], mib
            pos[worker] += mib
            if pos[worker] >= 2048 * mib:
                pos[worker], current[worker] = 0, current[worker] + 8
            worker = (worker + 1) % 8

    def embed_reads():
        weights = np.arange(1, 16385, dtype=float) ** -1.1
        weights /= weights.sum()
        while True:
            blocks = rng.choice(16384, size=4096, p=weights)
            rows = rng.integers(0, 64, size=4096)
            for b, r in zip(blocks.tolist(), rows.tolist()):
                yield "emb/table.bin", b * block + r * 65536, 65536

    def eval_reads():
        while True:
            for name in evals:
                for b in range(4):
                    yield name, b * block, block

    jobs = ("train", "tokens", "embed", "eval")
    sources = [train_reads(), token_reads(), embed_reads(), eval_reads()]
    for j in rng.choice(4, size=accesses, p=[0.4, 0.3, 0.2, 0.1]).tolist():
        path, offset, size = next(sources[j])
        yield path, offset, size, jobs[j]
