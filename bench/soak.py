"""``igtcache bench soak``: every kind of reader against the daemon and a local S3 server under seeded faults.

Readers read random ranges (1 B to 64 KiB, a third of them across a block
boundary) of a dataset of 12 objects (a few KiB to 1 MiB) on moto, started
as a child process on 127.0.0.1:

  embedded  threads of one process sharing an embedded igtcache.Cache
  client    processes with a DaemonClient of the daemon  } --processes of them,
  fsspec    processes with the igtcache:: fsspec plugin  } alternating
  fuse      one process reading files of an `igtcache mount` of the daemon
            (left out, saying why, where /dev/fuse or fusermount3 is missing)

Meanwhile a chaos driver injects one fault at a time, in rounds that are a
permutation of every kind drawn from --seed, 1-2 s apart:

  daemon_kill   SIGKILL the daemon, start it again
  s3_restart    kill moto and start it again (empty): the bucket is created
                and every object uploaded again
  overwrite     new content for 1-3 objects, half of them with a new size
  disk_full     fill the file system of the daemon's cache dir (a 64 MiB
                tmpfs; skipped, saying why, without root or mount rights),
                make the daemon fetch everything again, then free it
  lmdb_corrupt  stop the daemon, overwrite bytes in its LMDB data.mdb, start it
  block_size    restart the daemon on its cache dir with another --block-size

The daemon runs with a short --ttl so that overwrites show up. Oracle: a
read's bytes must equal that range of one version of the object that was
current at some time in [start - ttl - slack, end] (for the mount, plus twice
its attribute timeout, and the length may be clipped at any such version's
size). Bytes that match none are wrong bytes; exceptions are counted by type
(allowed during faults). Every attempt has a client-side timeout, and a
failed read is tried once more.

Figures: reads, wrong_bytes, faults_injected per kind, errors per type,
longest_stall_s (the slowest read, both attempts), recovery_s per fault
kind (the longest time from a fault's end until every reader kind had read
correctly again), timeout_s. Exit status 1 if any byte was wrong.

The run stops by itself after --minutes (at least one round of every
fault), and always cleans up: daemon, moto, mount and tmpfs go on exit,
Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Callable

from igtcache.bench.soak_chaos import BLOCK_SIZES, FAULTS, ChaosDriver, Rig
from igtcache.bench.soak_dataset import Dataset
from igtcache.bench.soak_readers import RETRY_PAUSE_S, ReaderSpec, reader_main
from igtcache.bench.soak_report import SoakResult, Tally
from igtcache.bench.soak_services import DaemonRig, MotoProcess, mount_fuse, mount_tmpfs, work_dir

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "igtcache-soak"
TTL_S = 2.0  # the daemon's and the embedded cache's --ttl
MOUNT_TTL_S = 0.5  # the mount's listings and the kernel's attributes
SLACK_S = 1.0  # a stat's own duration and scheduling delays on a loaded machine
TIMEOUT_S = 5.0
READY_TIMEOUT_S = 120.0  # reader processes importing the engine on two busy cores
PROGRESS_EVERY_S = 5.0


def run_soak(minutes: float = 3.0, seed: int = 0, *, faults: tuple[str, ...] = tuple(FAULTS), processes: int = 2,
             threads: int = 3, timeout: float = TIMEOUT_S, ttl: float = TTL_S,
             note: Callable[[str], None] | None = None) -> SoakResult:
    """Run the soak for ``minutes`` (at least one round of ``faults``) and return what it measured.

    ``processes`` daemon readers (DaemonClient and fsspec plugin, alternating),
    ``threads`` embedded reader threads, ``timeout`` seconds per read attempt.
    ``note`` gets progress lines (default: none). Everything it starts is
    stopped before it returns or raises.
    """
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    note = note or (lambda text: None)
    with contextlib.ExitStack() as stack:
        atexit.register(stack.close)  # should the interpreter exit some other way
        try:
            return _soak(stack, minutes, seed, tuple(faults), processes, threads, timeout, ttl, note)
        finally:
            atexit.unregister(stack.close)


def _soak(stack: contextlib.ExitStack, minutes: float, seed: int, faults: tuple[str, ...], processes: int,
          threads: int, timeout: float, ttl: float, note: Callable[[str], None]) -> SoakResult:
    work = work_dir(stack)
    rig = _services(stack, work, seed, ttl, note)
    mountpoint = os.path.join(work, "mnt")
    os.mkdir(mountpoint)
    fuse_missing = mount_fuse(rig.daemon.socket_path, mountpoint, MOUNT_TTL_S, stack)
    if fuse_missing:
        note(f"fuse reader left out: {fuse_missing}")
    specs = _reader_specs(rig, work, None if fuse_missing else mountpoint, seed, processes, threads, timeout,
                          ttl, stop_at=time.monotonic() + minutes * 60 + 300)
    kinds = sorted({spec.kind for spec in specs})
    lookback = {kind: ttl + SLACK_S for kind in kinds} | {"fuse": ttl + 2 * MOUNT_TTL_S + SLACK_S}
    tally = Tally(rig.dataset, lookback)
    conns = _start_readers(specs, stack)
    note(f"soak: {minutes:g} min, seed {seed}; readers: {', '.join(s.name for s in specs)} "
         f"(embedded: {threads} threads); {len(rig.dataset.keys)} objects on moto at {rig.moto.endpoint}")

    driver = ChaosDriver(rig, seed, faults)
    started = time.monotonic()
    chaos = threading.Thread(target=driver.run, args=(started + minutes * 60,), name="soak-chaos", daemon=True)
    chaos.start()
    stack.callback(chaos.join, 60)  # before the services go: a fault in progress must not start them again
    stack.callback(driver.stop.set)
    _watch(conns, tally, driver, chaos, kinds, started, started + minutes * 60 + 180, timeout, note)
    ended = time.monotonic()
    driver.stop.set()
    chaos.join(60)
    _stop_readers(conns, tally, timeout)
    skipped = dict(driver.skipped) | ({"reader:fuse": fuse_missing} if fuse_missing else {})
    return SoakResult.build(tally, driver.events, faults, kinds, started, ended, seed=seed, timeout_s=timeout,
                            stall_bound_s=round(2 * timeout + RETRY_PAUSE_S, 3), skipped=skipped,
                            fault_failures=driver.failures, daemon_errors=rig.daemon.logged_errors())


def _services(stack: contextlib.ExitStack, work: str, seed: int, ttl: float, note: Callable[[str], None]) -> Rig:
    """moto with the dataset uploaded, and the daemon on it (its cache dir on a small tmpfs where possible)."""
    cache_dir = os.path.join(work, "daemon-cache")
    os.mkdir(cache_dir)
    tmpfs_missing = mount_tmpfs(cache_dir, "64m", stack)
    moto = MotoProcess(os.path.join(work, "moto.log"))
    stack.callback(moto.kill)
    moto.start()
    daemon = DaemonRig(os.path.join(work, "daemon.sock"), cache_dir, BUCKET, moto.storage_options(),
                       block_size=BLOCK_SIZES[0], ttl=ttl, memory=512 * KiB, disk=32 * MiB)
    stack.callback(daemon.close)
    dataset = Dataset(seed)
    rig = Rig(moto, daemon, dataset, BUCKET, tmpfs_missing, note)
    for key in dataset.keys:
        dataset.begin(key)
    rig.upload_all()
    daemon.start()
    return rig


def _reader_specs(rig: Rig, work: str, mountpoint: str | None, seed: int, processes: int, threads: int,
                  timeout: float, ttl: float, stop_at: float) -> list[ReaderSpec]:
    """The embedded reader, ``processes`` daemon readers (DaemonClient and fsspec alternating), and the
    FUSE reader if there is a mount."""
    common = dict(seed=seed, bands=rig.dataset.bands, block_sizes=BLOCK_SIZES, timeout=timeout, stop_at=stop_at,
                  socket=rig.daemon.socket_path, bucket=BUCKET, storage_options=rig.moto.storage_options(), ttl=ttl)
    specs = [ReaderSpec("embedded", "embedded", threads=threads, cache_dir=os.path.join(work, "embedded"),
                        **common)]
    specs += [ReaderSpec(kind, f"{kind}-{i}", **common)
              for i, kind in ((i, ("client", "fsspec")[i % 2]) for i in range(processes))]
    if mountpoint:
        specs.append(ReaderSpec("fuse", "fuse", mountpoint=mountpoint, **common))
    return specs


def _watch(conns: dict, tally: Tally, driver: ChaosDriver, chaos: threading.Thread, kinds: list[str],
           started: float, hard_end: float, timeout: float, note: Callable[[str], None]) -> None:
    """Check reads as they come until the chaos is over and every reader kind has read correctly since
    the last fault (or a while has passed), or ``hard_end`` (a fault that hangs must not hold the soak)."""
    last_progress = started
    settle_until = None
    while conns:
        for conn in _collect(conns, tally, 0.5):
            note(f"reader {conns.pop(conn)} ended early")
        now = time.monotonic()
        if now - last_progress >= PROGRESS_EVERY_S:
            last_progress = now
            note(f"[{now - started:6.1f} s] reads {sum(tally.reads.values())}  wrong bytes {tally.wrong_bytes}  "
                 f"faults {len(driver.events)}  errors {sum(tally.errors.values())}")
        if now > hard_end:
            driver.failures.append("the soak ran past its hard end; chaos stopped")
            return
        if chaos.is_alive():
            continue
        settle_until = settle_until or now + 2 * timeout + 5
        last_end = driver.events[-1].end if driver.events else started
        if tally.recovered(last_end, kinds) or now > settle_until:
            return


def _start_readers(specs: list[ReaderSpec], stack: contextlib.ExitStack) -> dict:
    """Start one process per spec and wait until each is ready; ``{connection: name}``."""
    ctx = multiprocessing.get_context("spawn")  # the parent runs threads: never fork it
    conns = {}
    for spec in specs:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=reader_main, args=(spec, child), name=f"soak-{spec.name}", daemon=True)
        process.start()
        child.close()
        stack.callback(_end_process, process)
        conns[parent] = spec.name
    waiting = set(conns)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        ready = wait(list(waiting), max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"readers not ready after {READY_TIMEOUT_S:.0f} s: "
                               f"{', '.join(conns[c] for c in waiting)}")
        for conn in ready:
            message = _receive(conn)
            if message is None or message[0] == "failed":
                raise RuntimeError(f"reader {conns[conn]} could not start: "
                                   f"{message[2] if message else 'it exited'}")
            waiting.discard(conn)
    return conns


def _receive(conn) -> tuple | None:
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def _collect(conns: dict, tally: Tally, timeout: float) -> list:
    """Take in every message waiting (up to ``timeout`` for the first); the connections now closed."""
    closed = []
    for conn in wait(list(conns), timeout):
        while True:
            message = _receive(conn)
            if message is None or message[0] == "done":
                closed.append(conn)
                break
            if message[0] == "read":
                tally.add(*message[1:])
            if not conn.poll():
                break
    return closed


def _stop_readers(conns: dict, tally: Tally, timeout: float) -> None:
    """Tell every reader to stop and take in its last reads."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send("stop")
    open_conns = dict(conns)
    deadline = time.monotonic() + 2 * timeout + RETRY_PAUSE_S + 10
    while open_conns and time.monotonic() < deadline:
        for conn in _collect(open_conns, tally, 0.5):
            open_conns.pop(conn)
    for conn in conns:
        conn.close()


def _end_process(process: multiprocessing.Process) -> None:
    process.join(1)  # told to stop, it has sent its last reads already
    if process.is_alive():
        process.kill()
        process.join(5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igtcache bench soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  igtcache bench soak --minutes 3 --json\n"
                                            "  igtcache bench soak --minutes 30 --seed 7 --processes 4")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="how long to inject faults (default 3; one round of every fault at least)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the faults' order and details, the dataset "
                        "and each reader's ranges (default 0)")
    parser.add_argument("--faults", default=",".join(FAULTS), metavar="KIND,...",
                        help="the faults to inject, to find which one breaks something (default: all)")
    parser.add_argument("--processes", type=int, default=2,
                        help="reader processes on the daemon, DaemonClient and fsspec alternating (default 2)")
    parser.add_argument("--threads", type=int, default=3, help="reader threads on the embedded cache (default 3)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help=f"client-side seconds per read attempt (default {TIMEOUT_S:g})")
    parser.add_argument("--ttl", type=float, default=TTL_S,
                        help=f"the caches' TTL: how soon an overwrite must show (default {TTL_S:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.processes < 0 or args.threads < 1 or args.timeout <= 0 or args.minutes < 0:
        _parser().error("--processes >= 0, --threads >= 1, --timeout > 0 and --minutes >= 0, please")
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    if not faults or set(faults) - set(FAULTS):
        _parser().error(f"--faults: choose from {', '.join(FAULTS)}")
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        print(f"igtcache bench soak needs the test extra (moto[server], boto3): {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        result = run_soak(args.minutes, args.seed, faults=faults, processes=args.processes, threads=args.threads,
                          timeout=args.timeout, ttl=args.ttl, note=note)
    except RuntimeError as exc:
        print(f"igtcache bench soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("igtcache bench soak: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    if args.json:
        note(result.table())  # the details, for whoever reads along
        print(json.dumps(result.summary()))
    else:
        print(result.table())
    return 1 if result.wrong_bytes else 0


if __name__ == "__main__":
    sys.exit(main())
