"""IGT on an inference node: whole adapters read ahead, skewed tables kept, both on one link."""

from __future__ import annotations

from igtcache.policies import IGT
from igtcache.read_driver import ReadDriver

KiB, MiB = 1024, 1024**2


def load(driver: ReadDriver, ts: float, job: str, path: str, size: int, piece: int) -> list[list[int]]:
    """Read ``path`` whole in ``piece``-sized reads; the readahead block indices each read issued."""
    issued = []
    for offset in range(0, size, piece):
        plan = driver.plan(ts=ts, job=job, path=path, version="v", offset=offset, size=piece, object_size=size)
        issued.append([f.key.index for f in plan.fetches if f.prefetched])
        for fetch in plan.fetches:
            driver.arrived(fetch.key, fetch.length, 0.02)
        driver.finish(plan)
        ts += 0.001
    return issued


def test_a_whole_object_load_is_read_ahead_from_its_first_piece():
    driver = ReadDriver(IGT(64 * MiB), MiB)
    load(driver, 0.0, "serve", "adapters/a/adapter.safetensors", 6 * MiB, 256 * KiB)
    issued = load(driver, 1.0, "serve", "adapters/b/adapter.safetensors", 6 * MiB, 256 * KiB)
    assert issued[0] == [1, 2, 3, 4, 5]  # the job loads objects whole: the rest of b, from b's first piece
    assert not any(issued[1:])
