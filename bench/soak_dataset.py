"""The soak's dataset and its oracle: every version of every object, and when each was current.

Content is a function of (seed, key, generation), so a version is cheap to
make and to keep. A version counts as current from the moment its upload
starts (a reader may see it from then on) until the moment the upload of its
successor finishes (until then the old one may still be served): intervals
of successive versions overlap by the length of an upload, which only ever
widens what a read may return.

Times are ``time.monotonic()``: on Linux that clock is system-wide, so the
reader processes' timestamps compare with the driver's.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
# Largest size per object, one entry per object: small objects (one block or
# less), medium ones and large ones spanning many blocks of any block size.
# An object's size is drawn in [band / 2, band].
BANDS = (8 * KiB,) * 3 + (256 * KiB,) * 5 + (1 * MiB,) * 4


@dataclass
class Version:
    """One content of one object and the interval during which it was current."""

    gen: int
    data: bytes
    start: float
    end: float | None = None  # None: still current

    def current_during(self, lo: float, hi: float) -> bool:
        return self.start <= hi and (self.end is None or self.end >= lo)


@dataclass
class Verdict:
    """How one read compares with the versions current during its window."""

    ok: bool
    wrong_bytes: int  # 0 if ok, else the bytes differing from the closest candidate
    closest: int | None  # generation of the closest candidate
    candidates: list[int] = field(default_factory=list)


class Dataset:
    """Objects ``obj-00``, ``obj-01``, ... with their full version history. Thread-safe."""

    def __init__(self, seed: int, bands: tuple[int, ...] = BANDS) -> None:
        self.seed = seed
        self.bands = dict(zip((f"obj-{i:02d}" for i in range(len(bands))), bands))
        self.keys = list(self.bands)
        self._rng = random.Random(f"dataset-{seed}")
        self._history: dict[str, list[Version]] = {key: [] for key in self.keys}
        self._lock = threading.Lock()

    def begin(self, key: str, size: int | None = None) -> Version:
        """A new version of ``key`` about to be uploaded (a new random size within its band unless ``size``)."""
        with self._lock:
            history = self._history[key]
            if size is None:
                band = self.bands[key]
                size = self._rng.randint(band // 2, band)
            gen = len(history)
            data = np.random.default_rng([self.seed, self.keys.index(key), gen]).bytes(size)
            version = Version(gen, data, time.monotonic())
            history.append(version)
            return version

    def commit(self, key: str, version: Version) -> None:
        """``version`` is uploaded: every earlier version of ``key`` stops being current now."""
        with self._lock:
            now = time.monotonic()
            for old in self._history[key]:
                if old is not version and old.end is None:
                    old.end = now

    def latest(self, key: str) -> Version:
        """The newest version of ``key``: what the remote should hold."""
        with self._lock:
            return self._history[key][-1]

    def versions(self) -> int:
        with self._lock:
            return sum(len(h) for h in self._history.values())

    def check(self, key: str, offset: int, size: int, data: bytes, lo: float, hi: float,
              any_size: bool = False) -> Verdict:
        """Whether ``data``, read at ``[offset, offset+size)``, equals that range of one version of ``key``
        current at some time in ``[lo, hi]`` (clipped at its end).

        ``any_size``: the read may also be clipped at the size of any other
        candidate (a file system that cached an older size, as a FUSE mount's
        kernel does for its attribute timeout).
        """
        with self._lock:
            candidates = [v for v in self._history[key] if v.current_during(lo, hi)]
        sizes = {len(v.data) for v in candidates} if any_size else {None}
        gens = [v.gen for v in candidates]
        best: tuple[int, int | None] = (max(1, len(data)), None)  # no candidate at all: every byte is wrong
        for version in candidates:
            for clip in sizes:
                end = offset + size if clip is None else min(offset + size, clip)
                expected = version.data[offset:end]
                if data == expected:
                    return Verdict(True, 0, version.gen, gens)
                wrong = _mismatches(data, expected)
                if best[1] is None or wrong < best[0]:
                    best = (wrong, version.gen)
        return Verdict(False, best[0], best[1], gens)


def _mismatches(data: bytes, expected: bytes) -> int:
    """Bytes of ``data`` that differ from ``expected``, counting missing and extra bytes."""
    n = min(len(data), len(expected))
    differ = np.count_nonzero(np.frombuffer(data, np.uint8, n) != np.frombuffer(expected, np.uint8, n)) if n else 0
    return int(differ) + abs(len(data) - len(expected))
