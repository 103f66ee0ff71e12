"""The soak's figures: every read checked against the oracle as it arrives (``Tally``), then the
result (``SoakResult``), its JSON summary and its table."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from igtcache.bench.soak_chaos import FaultEvent, counts
from igtcache.bench.soak_dataset import Dataset

TARGET = "target: 0 wrong bytes, no stall longer than timeout + one retry"
WRONG_KEPT = 50  # wrong reads kept in detail


@dataclass
class WrongRead:
    """A read whose bytes matched no version current during its window."""

    kind: str
    key: str
    offset: int
    size: int
    t0: float
    t1: float
    got: int  # bytes returned
    wrong_bytes: int
    closest: int | None  # generation it came closest to
    candidates: list[int]
    context: str = ""  # the faults around it, filled in by ``SoakResult``


class Tally:
    """Reads, checked as they arrive. ``lookback[kind]``: how far before a read's start a version
    may have stopped being current and still be served (TTLs plus slack)."""

    def __init__(self, dataset: Dataset, lookback: dict[str, float], any_size: tuple[str, ...] = ("fuse",)) -> None:
        self.dataset = dataset
        self.lookback = lookback
        self.any_size = any_size
        self.reads: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong_bytes = 0
        self.wrong: list[WrongRead] = []  # the first WRONG_KEPT in detail
        self.wrong_times: list[tuple[str, float, int]] = []  # every wrong read: kind, start, wrong bytes
        self.longest_stall = 0.0
        self.longest_read: tuple[str, float, float] = ("", 0.0, 0.0)  # the slowest: what, start, end
        self.first_errors: dict[str, tuple[str, float, str]] = {}  # type -> (read, start, message)
        self._good: dict[str, list[tuple[float, float]]] = {}  # kind -> (t0, t1) of correct reads
        self._last_good: dict[str, float] = {}  # kind -> latest start of a correct read

    def add(self, kind: str, key: str, offset: int, size: int, t0: float, t1: float,
            data: bytes | None, error: str | None, detail: str | None) -> None:
        self.reads[kind] += 1
        if t1 - t0 > self.longest_stall:
            self.longest_stall = t1 - t0
            self.longest_read = (f"{kind} {key} [{offset}, +{size}) {error or 'ok'}", t0, t1)
        if error is not None:
            self.errors[error] += 1
            self.first_errors.setdefault(error, (f"{kind} {key} [{offset}, +{size})", t0, detail or ""))
            return
        verdict = self.dataset.check(key, offset, size, data, t0 - self.lookback[kind], t1, kind in self.any_size)
        if verdict.ok:
            self._good.setdefault(kind, []).append((t0, t1))
            self._last_good[kind] = max(t0, self._last_good.get(kind, t0))
            return
        self.wrong_bytes += verdict.wrong_bytes
        self.wrong_times.append((kind, t0, verdict.wrong_bytes))
        if len(self.wrong) < WRONG_KEPT:
            self.wrong.append(WrongRead(kind, key, offset, size, t0, t1, len(data), verdict.wrong_bytes,
                                        verdict.closest, verdict.candidates))

    def recovered(self, since: float, kinds: list[str]) -> bool:
        """Whether every reader kind has had a correct read that started after ``since``."""
        return all(self._last_good.get(kind, since - 1) >= since for kind in kinds)

    def recovery(self, ends: list[float], kinds: list[str]) -> list[dict[str, float | None]]:
        """For each time in ``ends``, per reader kind: seconds from it until the first correct read that
        started at or after it had ended (None if none did)."""
        out: list[dict[str, float | None]] = [{} for _ in ends]
        for kind in kinds:
            reads = sorted(self._good.get(kind, []))
            starts = [t0 for t0, _ in reads]
            first_end = [t1 for _, t1 in reads]  # then: the earliest end of read i and every later one
            for i in range(len(first_end) - 2, -1, -1):
                first_end[i] = min(first_end[i], first_end[i + 1])
            for row, since in zip(out, ends):
                at = bisect.bisect_left(starts, since)
                row[kind] = first_end[at] - since if at < len(starts) else None
        return out


@dataclass
class SoakResult:
    """Everything a soak measured. ``summary()`` is the JSON figure set."""

    seed: int
    seconds: float
    timeout_s: float
    stall_bound_s: float
    reads: dict[str, int]  # per reader kind
    wrong_bytes: int
    wrong_reads: int
    wrong: list[WrongRead]
    faults_injected: dict[str, int]
    errors: dict[str, int]
    longest_stall_s: float
    recovery_s: dict[str, float]
    wrong_by: dict[str, int] = field(default_factory=dict)  # "READER after FAULT" -> wrong bytes
    first_errors: dict[str, str] = field(default_factory=dict)  # error type -> its first read, in context
    longest_read: str = ""  # the slowest read, in context
    daemon_errors: list[str] = field(default_factory=list)  # errors the daemon logged, tracebacks included
    skipped: dict[str, str] = field(default_factory=dict)  # fault kind or "reader:KIND" -> why
    unrecovered: list[str] = field(default_factory=list)  # faults some reader kind never recovered from
    fault_failures: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, tally: Tally, events: list[FaultEvent], fault_kinds: tuple[str, ...], kinds: list[str],
              started: float, ended: float, **rest) -> "SoakResult":
        """The result of a soak that ran from ``started`` to ``ended`` with readers of ``kinds``."""
        for wrong in tally.wrong:
            wrong.context = _context(wrong.t0, wrong.t1, events, started)
        wrong_by: Counter[str] = Counter()
        for kind, t0, nbytes in tally.wrong_times:
            last = [e.kind for e in events if e.start <= t0]
            wrong_by[f"{kind} after {last[-1] if last else 'no fault'}"] += nbytes
        first_errors = {name: f"{read}: {message}; {_context(t0, t0, events, started)}"
                        for name, (read, t0, message) in sorted(tally.first_errors.items())}
        recovery, unrecovered = _recovery(tally, events, kinds, started, ended)
        what, t0, t1 = tally.longest_read
        longest_read = f"{what}; {_context(t0, t1, events, started)}" if what else ""
        return cls(reads=dict(tally.reads), wrong_bytes=tally.wrong_bytes, wrong_reads=len(tally.wrong_times),
                   wrong=tally.wrong, wrong_by=dict(wrong_by.most_common()),
                   faults_injected=counts(events, fault_kinds), errors=dict(tally.errors),
                   first_errors=first_errors, longest_stall_s=round(tally.longest_stall, 3),
                   longest_read=longest_read, recovery_s=recovery,
                   unrecovered=unrecovered, seconds=round(ended - started, 1), **rest)

    @property
    def total_reads(self) -> int:
        return sum(self.reads.values())

    @property
    def target_met(self) -> bool:
        return self.wrong_bytes == 0 and self.longest_stall_s <= self.stall_bound_s

    def summary(self) -> dict:
        """``{"reads", "wrong_bytes", "faults_injected", "errors", "longest_stall_s", "recovery_s", "timeout_s"}``."""
        return {"reads": self.total_reads, "wrong_bytes": self.wrong_bytes, "faults_injected": self.faults_injected,
                "errors": dict(sorted(self.errors.items())), "longest_stall_s": self.longest_stall_s,
                "recovery_s": self.recovery_s, "timeout_s": self.timeout_s}

    def table(self) -> str:
        """The figures for a person, with the target and whether it was met."""
        def pairs(d: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

        rows = [
            ("duration", f"{self.seconds} s, seed {self.seed}"),
            ("reads", f"{self.total_reads} ({pairs(self.reads)})"),
            ("wrong bytes", f"{self.wrong_bytes} in {self.wrong_reads} reads"),
            *((f"  {where}", f"{n} wrong bytes") for where, n in self.wrong_by.items()),
            ("faults injected", pairs(self.faults_injected)),
            ("errors", pairs(dict(sorted(self.errors.items())))),
            ("longest stall", f"{self.longest_stall_s:.3f} s (timeout {self.timeout_s} s per attempt, "
                              f"bound with one retry {self.stall_bound_s} s)"),
            ("recovery (s)", pairs(self.recovery_s)),
        ]
        rows += [(f"skipped {what}", why) for what, why in self.skipped.items()]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        lines += [f"slowest read: {self.longest_read}"] if self.longest_read else []
        lines += [f"first {name}: {text}" for name, text in self.first_errors.items()]
        lines += [f"daemon logged: {text}" for text in self.daemon_errors]
        lines += [f"unrecovered: {text}" for text in self.unrecovered]
        lines += [f"fault failed: {text}" for text in self.fault_failures]
        lines += [f"wrong read: {format_wrong(w)}" for w in self.wrong[:10]]
        lines.append(f"{TARGET}: {'met' if self.target_met else 'NOT met'}")
        return "\n".join(lines)


def format_wrong(w: WrongRead) -> str:
    """One wrong read on one line: where, how wrong, and among which faults."""
    return (f"{w.kind} {w.key} [{w.offset}, +{w.size}) got {w.got} bytes, {w.wrong_bytes} wrong "
            f"(closest gen {w.closest} of {w.candidates}), {w.t1 - w.t0:.3f} s; {w.context}")


def _recovery(tally: Tally, events: list[FaultEvent], kinds: list[str], started: float,
              ended: float) -> tuple[dict[str, float], list[str]]:
    """Per fault kind, the longest time from a fault's end until every reader kind read correctly again
    (until the end where one never did), and the faults some reader kind never recovered from."""
    recovery: dict[str, float] = {}
    unrecovered = []
    for event, times in zip(events, tally.recovery([e.end for e in events], kinds)):
        missing = [kind for kind, t in times.items() if t is None]
        if missing:
            unrecovered.append(f"{event.kind} ended at +{event.end - started:.1f} s: "
                               f"no correct read since by {', '.join(missing)}")
        worst = max(((ended - event.end) if t is None else t for t in times.values()), default=0.0)
        recovery[event.kind] = round(max(recovery.get(event.kind, 0.0), worst), 3)
    return recovery, unrecovered


def _context(t0: float, t1: float, events: list[FaultEvent], started: float) -> str:
    """Where a read fell among the faults: at +T s, the last fault before it and any during it."""
    before = [e for e in events if e.end <= t0]
    during = [e.kind for e in events if e.start < t1 and e.end > t0]
    text = f"at {t0 - started:+.1f} s"
    if before:
        last = before[-1]
        text += f", {t0 - last.end:.1f} s after {last.kind} ({last.detail})"
    if during:
        text += f", during {', '.join(during)}"
    return text
