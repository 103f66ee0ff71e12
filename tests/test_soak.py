"""The fault soak (``igtcache bench soak``): its oracle, and a short soak with every fault and reader kind."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from igtcache.bench.soak import run_soak
from igtcache.bench.soak_chaos import FAULTS
from igtcache.bench.soak_dataset import Dataset
from igtcache.bench.soak_readers import KINDS
from igtcache.bench.soak_report import format_wrong
from igtcache.fuse.available import fuse_unusable

KiB = 1 << 10


def _overwritten(dataset: Dataset, key: str) -> tuple[bytes, bytes, float, float]:
    """Two versions of ``key`` of one size: (old, new, when new began, when new was committed)."""
    old = dataset.begin(key, 64 * KiB)
    dataset.commit(key, old)
    time.sleep(0.01)
    new = dataset.begin(key, 64 * KiB)
    time.sleep(0.01)
    dataset.commit(key, new)
    return old.data, new.data, new.start, old.end


def test_oracle_takes_any_version_current_in_the_window_but_never_a_mix():
    dataset = Dataset(seed=1)
    key = dataset.keys[3]
    old, new, new_start, old_end = _overwritten(dataset, key)
    now = time.monotonic()
    assert dataset.check(key, 100, 50, new[100:150], now, now).ok
    assert dataset.check(key, 100, 50, old[100:150], old_end - 1, now).ok  # the window reaches back to old
    assert not dataset.check(key, 100, 50, old[100:150], old_end + 0.001, now).ok  # it does not
    mixed = old[100:125] + new[125:150]
    verdict = dataset.check(key, 100, 50, mixed, new_start - 1, now)
    assert not verdict.ok and verdict.wrong_bytes in range(20, 26)  # the closest version's differing bytes
    assert dataset.check(key, 64 * KiB - 10, 50, new[-10:], now, now).ok  # clipped at the end
    short = dataset.check(key, 64 * KiB - 10, 50, new[-10:-5], now, now)
    assert not short.ok and short.wrong_bytes == 5  # missing bytes count


def test_oracle_lets_a_mount_clip_at_a_size_it_still_believes():
    dataset = Dataset(seed=2)
    key = dataset.keys[5]
    dataset.commit(key, dataset.begin(key, 32 * KiB))
    grown = dataset.begin(key, 48 * KiB)
    dataset.commit(key, grown)
    now = time.monotonic()
    read = grown.data[30 * KiB:32 * KiB]  # the kernel still had the old size
    assert not dataset.check(key, 30 * KiB, 8 * KiB, read, now - 5, now).ok
    assert dataset.check(key, 30 * KiB, 8 * KiB, read, now - 5, now, any_size=True).ok


def _tmpfs_unusable(where) -> str | None:
    """Why a small tmpfs cannot be mounted here, or None."""
    if os.geteuid() != 0:
        return "not root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        return done.stderr.decode(errors="replace")
    subprocess.run(["umount", str(where)], check=True)
    return None


@pytest.mark.timeout(150)
def test_short_soak_every_fault_every_reader(tmp_path):
    notes: list[str] = []
    result = run_soak(minutes=0.5, seed=1, note=notes.append)

    assert result.wrong_bytes == 0, "\n".join(map(format_wrong, result.wrong[:10]))
    assert not result.fault_failures, result.fault_failures
    missing = {"disk_full": _tmpfs_unusable(tmp_path), "reader:fuse": fuse_unusable()}
    for kind in FAULTS:
        if result.faults_injected[kind] == 0:
            assert missing.get(kind), f"{kind} was not injected though this machine can: {result.skipped.get(kind)}"
            assert result.skipped.get(kind), f"{kind} was left out without a reason"
    for kind in KINDS:
        if kind == "fuse" and missing["reader:fuse"]:
            assert result.skipped.get("reader:fuse")
            continue
        assert result.reads.get(kind, 0) > 0, f"no reads by the {kind} reader: {result.reads}"
    assert result.longest_stall_s <= result.stall_bound_s, result.longest_stall_s
    assert not result.unrecovered, result.unrecovered
    assert set(result.summary()) == {"reads", "wrong_bytes", "faults_injected", "errors", "longest_stall_s",
                                     "recovery_s", "timeout_s"}
