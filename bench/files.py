"""Files the benchmarks read."""

from __future__ import annotations

import os

MiB = 1 << 20


def write_random_file(path: str, size: int) -> None:
    """``size`` bytes (rounded down to whole MiB) of random data at ``path``."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
