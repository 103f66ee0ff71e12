"""Access-pattern classification by hypothesis tests.

A *stream* is a sequence of integer item ids in access order: block numbers
inside a file, or ordinals (name rank) of the children of a directory.
:func:`classify` labels it :class:`Pattern` ``sequential``, ``random``,
``skewed`` or ``unknown``. Every label is the outcome of a test with a stated
null hypothesis at significance ``alpha`` (docs/classifier.md has the full
write-up):

* **Runs.** Consecutive repeats of one item (a read that re-reads the block the
  previous read ended in) are one *visit*; all tests run on visits.
* **S, sequential.** H0: a visit is no more likely to follow on from its own
  recent past than from any other recent stretch of the stream (the order
  carries no forward succession). Statistic: *forward successors*, steps
  whose item lies in ``(p, p + K]`` for one of the ``D`` preceding visits
  ``p``; ``K`` is :data:`GAP_FACTOR` times the median spacing of the
  distinct items (strides and small gaps count) and looking ``D`` visits
  back lets interleaved scans count. The null rate is measured on the
  stream itself: each visit set against the predecessors of a visit a
  little later (:data:`NULL_SHIFTS` disjoint shifts). Given the two counts'
  total, the observed ones are binomial under H0 (a conditional test of two
  rates); reject -> ``sequential``.
* **U, uniform frequencies.** H0: visits are independent and uniform over a
  support of unknown size. Two statistics, Bonferroni-combined:
  (a) *collisions* -- the pairs of visits to one item, Poisson against
  ``C(n, 2) / S`` with ``S`` the support spanned by the items (big holes and a
  common stride discounted); (b) *hottest item* -- the largest visit count
  against a zero-truncated Poisson fitted to the visits per distinct item,
  which needs no support size. Reject -> ``skewed``.
* **O, not a scan.** H0: the stream is a scan, i.e. at least a share
  ``(1 + p0) / 2`` of steps are successors, ``p0`` the null rate of S
  (halfway between a random order and a perfect scan). One-sided binomial
  test; reject -> ``random``.

Decision: fewer than :data:`MIN_VISITS` visits -> ``unknown``; else S rejects
-> ``sequential``; else U rejects -> ``skewed``; else O rejects -> ``random``;
else ``unknown``.

The p-values use the scipy kernels behind ``scipy.stats.binom`` and
``scipy.stats.poisson`` (``scipy.special.bdtr``/``bdtrc``/``pdtrc``): the
``scipy.stats`` wrappers spend ~40 us per call on argument checks, which the
stream tree cannot afford; tests/test_classify.py checks both agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np
from scipy import special

#: Fewer visits than this is never enough evidence: ``unknown``.
MIN_VISITS = 8
#: A step is a forward successor if it lands at most this many median
#: spacings ahead of a recent visit.
GAP_FACTOR = 2
#: Most preceding visits a step may succeed (interleaved scans).
MAX_LOOKBACK = 8
#: Shifted copies of the stream that estimate the random-order successor rate.
NULL_SHIFTS = 4
#: A spacing over this many median spacings splits the support into clusters.
HOLE_FACTOR = 16


class Pattern(str, Enum):
    """The access pattern of a stream."""

    SEQUENTIAL = "sequential"
    RANDOM = "random"
    SKEWED = "skewed"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """A label with the evidence behind it.

    ``p_sequential``, ``p_uniform`` and ``p_scan`` are the p-values of tests
    S, U and O (1.0 where not computed); ``successor_rate`` is the observed
    share of forward-successor steps and ``null_rate`` the share measured on
    the shifted copies (its estimate under H0 of test S).
    """

    label: Pattern
    visits: int
    p_sequential: float = 1.0
    p_uniform: float = 1.0
    p_scan: float = 1.0
    successor_rate: float = 0.0
    null_rate: float = 0.0


def visits(items: Sequence[int] | np.ndarray) -> np.ndarray:
    """``items`` as int64 with runs of one repeated item collapsed to one visit."""
    x = np.asarray(items, dtype=np.int64).ravel()
    if x.size < 2:
        return x
    keep = np.empty(x.size, dtype=bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def lookback(n: int) -> int:
    """How many preceding visits a step may succeed, for a stream of ``n`` visits.

    Grows with ``n`` (2 below 64 visits, :data:`MAX_LOOKBACK` from 128): each
    extra predecessor raises the null rate, which short streams cannot afford.
    """
    return min(MAX_LOOKBACK, max(2, n // 16))


def classify(items: Sequence[int] | np.ndarray, alpha: float = 0.01) -> Pattern:
    """The :class:`Pattern` of a stream of item ids given in access order."""
    return analyze(items, alpha).label


def analyze(items: Sequence[int] | np.ndarray, alpha: float = 0.01) -> Verdict:
    """Run tests S, U and O on ``items`` and return the label with its evidence."""
    x = visits(items)
    n = int(x.size)
    if n < MIN_VISITS:
        return Verdict(Pattern.UNKNOWN, n)
    s = np.sort(x)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    distinct = s[starts]
    counts = np.diff(np.append(starts, n))
    spacing = distinct[1:] - distinct[:-1]
    median_spacing = int(np.sort(spacing)[spacing.size // 2])
    depth = lookback(n)

    # Test S: observed successors against the shifted copies' rate.
    steps = n - 1
    successes, null_successes, null_steps = _successor_counts(x, GAP_FACTOR * median_spacing, depth)
    if not null_steps:
        return Verdict(Pattern.UNKNOWN, n)
    p0 = null_successes / null_steps
    # Two rates compared conditionally: given their total, the observed
    # successes are Binomial(total, steps / (steps + null_steps)) under H0.
    share = steps / (steps + null_steps)
    total = successes + null_successes
    p_seq = float(special.bdtrc(successes - 1, total, share)) if successes else 1.0
    evidence = dict(visits=n, p_sequential=p_seq, successor_rate=successes / steps, null_rate=p0)
    if p_seq < alpha:
        return Verdict(Pattern.SEQUENTIAL, **evidence)

    # Test U: uniform frequencies, two statistics, Bonferroni.
    p_uni = 2.0 * min(_collision_p(n, counts, spacing, median_spacing), _hottest_p(n, counts))
    p_uni = min(1.0, p_uni)
    if p_uni < alpha:
        return Verdict(Pattern.SKEWED, p_uniform=p_uni, **evidence)

    # Test O: is the successor rate clearly below that of a scan?
    p_scan = float(special.bdtr(successes, steps, (1.0 + p0) / 2.0))
    label = Pattern.RANDOM if p_scan < alpha else Pattern.UNKNOWN
    return Verdict(label, p_uniform=p_uni, p_scan=p_scan, **evidence)


def _successor_counts(x: np.ndarray, reach: int, depth: int) -> tuple[int, int, int]:
    """Forward successors of the stream, and of its shifted copies with their steps.

    A step ``i`` succeeds if ``0 < x[i] - x[i-j] <= reach`` for some
    ``j <= depth``. The shifted copies set visit ``i`` against the
    predecessors of visit ``i + L`` instead, for up to :data:`NULL_SHIFTS`
    shifts ``L = depth + 1, 2 (depth + 1), ...`` (disjoint windows of visits
    shortly *after* ``i``). That keeps everything about the stream -- its
    items and their frequencies, the make-up of a window of recent visits
    (e.g. all distinct within an epoch), a drift from one phase to the next --
    except the alignment of a visit with its own recent past, which H0 says
    carries no information. Returns (successes, shifted successes, shifted steps).
    """
    positions, null_steps = _predecessors(x.size, depth)
    d = x[positions]
    np.subtract(x, d, out=d)
    d -= 1  # a successor has 0 <= d < reach; smaller d wraps to huge as uint64
    hits = (d.view(np.uint64) < reach).any(axis=0).sum(axis=1)
    return int(hits[0]), int(hits[1:].sum()), null_steps


@functools.lru_cache(maxsize=32)
def _predecessors(n: int, depth: int) -> tuple[np.ndarray, int]:
    """Positions of the ``depth`` predecessors of every visit, real then shifted.

    Shape ``(depth, 1 + NULL_SHIFTS, n)``, and the number of shifted steps. A
    visit without a full window (too early, or shifted past the end) points
    at itself: difference 0, never a success, and not counted as a step.
    """
    i = np.arange(n)
    j = np.arange(1, depth + 1)[:, None]
    rows = [np.where(i >= j, i - j, i)]
    steps = 0
    for r in range(1, NULL_SHIFTS + 1):
        shift = r * (depth + 1)
        rows.append(np.where(i <= n - shift, i + shift - j, i))
        steps += max(0, n - shift + 1)
    return np.stack(rows, axis=1).astype(np.intp), steps


def _collision_p(n: int, counts: np.ndarray, spacing: np.ndarray, median_spacing: int) -> float:
    """P(at least the observed pairs of visits to one item | uniform over the support).

    Under uniform sampling over ``S`` items the ``C(n, 2)`` pair indicators are
    pairwise independent with mean ``1/S``, so their sum has mean and variance
    ``~C(n, 2)/S``: a Poisson tail. ``S`` is the span of the distinct items in
    units of their common stride, leaving out holes over :data:`HOLE_FACTOR`
    median spacings (two readers in distant parts of a file are two supports;
    under H0 spacings are ~exponential and such a hole has odds ~e^-11).
    Underestimating ``S`` only makes the test conservative.
    """
    pairs = int((counts * (counts - 1)).sum()) // 2
    if pairs == 0:
        return 1.0
    stride = int(np.gcd.reduce(spacing))
    holes = spacing > HOLE_FACTOR * median_spacing
    support = int(spacing[~holes].sum()) // stride + int(holes.sum()) + 1
    return float(special.pdtrc(pairs - 1, n * (n - 1) / 2.0 / support))


def _hottest_p(n: int, counts: np.ndarray) -> float:
    """P(some item at least as hot as the hottest | uniform, support unknown).

    Under uniform sampling the visits per item are ~Poisson(lam); the items
    seen are those with at least one, so a zero-truncated Poisson whose mean
    ``lam / (1 - e^-lam)`` equals the observed visits per distinct item fixes
    ``lam`` (closed form with the Lambert W function).
    """
    m = counts.size
    r = n / m
    top = int(counts.max())
    if top < 2 or r <= 1.0:
        return 1.0
    lam = r + float(special.lambertw(-r * math.exp(-r)).real)
    if lam <= 0.0:
        return 1.0
    tail = float(special.pdtrc(top - 1, lam)) / -math.expm1(-lam)
    if tail >= 1.0:
        return 1.0
    return -math.expm1(m * math.log1p(-tail))
