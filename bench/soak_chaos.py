"""The soak's chaos driver: faults injected one at a time, in a seeded order, with quiet spells between.

Each fault is a small function of the ``Rig`` in ``FAULTS``; it returns once
the fault is over (the service is back), and the driver records when it
started and ended. A fault this environment cannot inject raises ``Skipped``
with the reason, once; it is not tried again.
"""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from igtcache.bench.soak_dataset import Dataset, Version
from igtcache.bench.soak_services import DaemonRig, MotoProcess

KiB = 1 << 10
#: Block sizes the daemon is restarted with: 40 and 96 KiB put boundaries inside the others' blocks.
BLOCK_SIZES = (64 * KiB, 96 * KiB, 40 * KiB, 128 * KiB)
LMDB_META_PAGES = 2 * 4096  # LMDB's two meta pages at the start of data.mdb
FILLER = "soak-filler"  # the file that fills the daemon's file system


class Skipped(Exception):
    """This environment cannot inject the fault; the message says why."""


@dataclass
class Rig:
    """What the faults act on."""

    moto: MotoProcess
    daemon: DaemonRig
    dataset: Dataset
    bucket: str
    tmpfs_missing: str | None  # why the daemon's cache dir is not on a small tmpfs, or None
    note: Callable[[str], None]

    def upload(self, key: str, version: Version) -> None:
        """Put ``version`` of ``key`` on the server and record it as current."""
        self.moto.client().put_object(Bucket=self.bucket, Key=key, Body=version.data)
        self.dataset.commit(key, version)

    def upload_all(self) -> None:
        """Create the bucket and put the newest version of every object (a fresh server is empty)."""
        client = self.moto.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=self.bucket)
        for key in self.dataset.keys:
            version = self.dataset.latest(key)
            client.put_object(Bucket=self.bucket, Key=key, Body=version.data)
            self.dataset.commit(key, version)

    def heal(self) -> None:
        """Bring every service back after a fault that failed half-way."""
        filler = Path(self.daemon.cache_dir) / FILLER
        filler.unlink(missing_ok=True)
        if not self.moto.running():
            self.moto.start()
            self.upload_all()
        if not self.daemon.running():
            try:
                self.daemon.start()
            except RuntimeError:
                # It cannot start on what is in its cache dir (a defect, recorded by the caller):
                # start it on an empty one so that the soak goes on.
                for entry in Path(self.daemon.cache_dir).iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                self.daemon.start()


def _stop_daemon(rig: Rig, rng: random.Random) -> str:
    """Stop the daemon cleanly (SIGTERM) or not (SIGKILL), drawn from ``rng``; which it was."""
    if rng.random() < 0.5:
        rig.daemon.stop()
        return "SIGTERM"
    rig.daemon.kill()
    return "SIGKILL"


def daemon_kill(rig: Rig, rng: random.Random) -> str:
    """SIGKILL the daemon, then start it again."""
    rig.daemon.kill()
    time.sleep(rng.uniform(0.1, 1.0))
    rig.daemon.start()
    return "killed and restarted"


def s3_restart(rig: Rig, rng: random.Random) -> str:
    """Kill the S3 server, start it again (empty), re-create the bucket and upload every object again."""
    rig.moto.kill()
    time.sleep(rng.uniform(0.3, 1.5))
    rig.moto.start()
    rig.upload_all()
    return f"{len(rig.dataset.keys)} objects uploaded again"


def overwrite(rig: Rig, rng: random.Random) -> str:
    """New content for one to three objects, half of the time with a new size."""
    keys = rng.sample(rig.dataset.keys, rng.randint(1, 3))
    for key in keys:
        same_size = len(rig.dataset.latest(key).data) if rng.random() < 0.5 else None
        rig.upload(key, rig.dataset.begin(key, same_size))
    return ", ".join(keys)


def disk_full(rig: Rig, rng: random.Random) -> str:
    """Fill the file system of the daemon's cache dir, make the daemon fetch and store everything
    again while it is full, then free it."""
    if rig.tmpfs_missing:
        raise Skipped(rig.tmpfs_missing)
    from igtcache.daemon_client import DaemonClient

    filler = Path(rig.daemon.cache_dir) / FILLER
    written = 0
    try:
        with open(filler, "wb") as f:
            chunk = b"\0" * (1 << 20)
            while True:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    with DaemonClient(rig.daemon.socket_path, timeout=10) as client:
        for key in rig.dataset.keys:
            client.invalidate(key)
    time.sleep(rng.uniform(1.0, 2.5))
    filler.unlink()
    return f"{written >> 20} MiB were free"


def lmdb_corrupt(rig: Rig, rng: random.Random) -> str:
    """Stop the daemon (SIGTERM or SIGKILL), overwrite bytes at random places of its LMDB data
    file (now and then in a meta page), start it again."""
    how = _stop_daemon(rig, rng)
    # The newest: environments the disk tier moved aside stay in the cache dir.
    files = sorted(Path(rig.daemon.cache_dir).rglob("data.mdb"), key=lambda p: p.stat().st_mtime)
    if not files:
        rig.daemon.start()
        return "no data.mdb yet"
    size = files[-1].stat().st_size
    spots = rng.randint(4, 16)
    with open(files[-1], "r+b") as f:
        for _ in range(spots):
            low = 0 if rng.random() < 0.1 else min(LMDB_META_PAGES, size - 1)
            f.seek(rng.randrange(low, size))
            f.write(rng.randbytes(rng.randint(1, 64)))
    rig.daemon.start()
    return f"{spots} spots in {size >> 10} KiB after {how}"


def block_size(rig: Rig, rng: random.Random) -> str:
    """Stop the daemon (SIGTERM or SIGKILL) and start it on the same cache dir with another block size."""
    how = _stop_daemon(rig, rng)
    new = rng.choice([b for b in BLOCK_SIZES if b != rig.daemon.block_size])
    old = rig.daemon.block_size
    rig.daemon.start(new)
    return f"{old >> 10} KiB -> {new >> 10} KiB after {how}"


FAULTS: dict[str, Callable[[Rig, random.Random], str]] = {
    "daemon_kill": daemon_kill,
    "s3_restart": s3_restart,
    "overwrite": overwrite,
    "disk_full": disk_full,
    "lmdb_corrupt": lmdb_corrupt,
    "block_size": block_size,
}


@dataclass
class FaultEvent:
    """One fault injected: its kind, when it began and ended (monotonic), what it did."""

    kind: str
    start: float
    end: float
    detail: str


@dataclass
class ChaosDriver:
    """Runs rounds of every fault (each round a seeded permutation) until ``until`` (monotonic) has
    passed and at least one round is done; ``stop`` cuts it short."""

    rig: Rig
    seed: int
    kinds: tuple[str, ...] = tuple(FAULTS)  # the faults to inject
    quiet: tuple[float, float] = (1.0, 2.0)  # seconds between faults
    events: list[FaultEvent] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, until: float) -> None:
        rng = random.Random(f"chaos-{self.seed}")
        rounds = 0
        while not self.stop.is_set() and (rounds == 0 or time.monotonic() < until):
            if rounds and set(self.kinds) <= set(self.skipped):
                return  # nothing left that this machine can inject
            for kind in rng.sample(self.kinds, len(self.kinds)):
                if kind in self.skipped:
                    continue
                if self.stop.wait(rng.uniform(*self.quiet)):
                    return
                self._inject(kind, rng)
            rounds += 1

    def _inject(self, kind: str, rng: random.Random) -> None:
        start = time.monotonic()
        try:
            detail = FAULTS[kind](self.rig, rng)
        except Skipped as exc:
            self.skipped[kind] = str(exc)
            self.rig.note(f"fault {kind} skipped: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a fault that broke a service: recorded, then healed
            detail = f"failed: {type(exc).__name__}: {exc}"
            self.failures.append(f"{kind}: {type(exc).__name__}: {exc}\n{self.rig.daemon.log_tail()}")
            try:
                self.rig.heal()
            except Exception as heal_exc:  # noqa: BLE001 - nothing left to soak against
                self.failures.append(f"{kind}: could not bring the services back: {heal_exc!r}")
                self.stop.set()
        end = time.monotonic()
        self.events.append(FaultEvent(kind, start, end, detail))
        self.rig.note(f"fault {kind} ({end - start:.1f} s): {detail}")


def counts(events: list[FaultEvent], kinds: tuple[str, ...] = tuple(FAULTS)) -> dict[str, int]:
    """Faults injected per kind (0 where none was)."""
    out = dict.fromkeys(kinds, 0)
    for event in events:
        out[event.kind] += 1
    return out
