"""Files the benchmarks read."""

from __future__ import annotations

import os

MiB = 1 << 20


def jittered_files(rng, sizes: dict[str, int], prefix: str, count: int, size: int) -> list[str]:
    """``count`` keys under ``prefix``, each given in ``sizes`` a size just under ``size``
    (jittered by ``rng``, a numpy Generator, so none is a multiple of a block)."""
    keys = [f"{prefix}/{i:05d}.bin" for i in range(count)]
    for key in keys:
        sizes[key] = size - 1 - int(rng.integers(0, size // 16))
    return keys


def write_random_file(path: str, size: int) -> None:
    """``size`` bytes (rounded down to whole MiB) of random data at ``path``."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
