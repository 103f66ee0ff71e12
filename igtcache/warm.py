"""``igtcache warm``: load a dataset into the node daemon's tiers, report how much of it they
hold (``--check``), or drop it (``--evict``).

Warming reads every file through the daemon's normal read path, as job
``igtcache-warm`` with the hint ``"warm"``, so the cache policy admits and
evicts the warmed blocks as it does any other read: a warm larger than the
cache does not push out what the policy values more. Files are read by
``--parallel`` threads sharing one ``DaemonClient`` (it is thread-safe), each
file in chunks of the daemon's ``--max-read``; the progress line is updated
under a lock.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import posixpath
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from igtcache.cli_advice import socket_advice
from igtcache.daemon.config import default_socket_path
from igtcache.daemon_client import DaemonClient, DaemonError, DaemonUnavailable
from igtcache.sizes import format_size

JOB = "igtcache-warm"
HINT = "warm"
PROG = "igtcache warm"

EPILOG = """\
examples:
  igtcache warm s3://my-bucket/datasets/imagenet --recursive --parallel 8
  igtcache warm train:shards --include '*.tar'     # remote `train` of the daemon, prefix shards
  igtcache warm s3://my-bucket/datasets/imagenet --recursive --check --verbose
  igtcache warm s3://my-bucket/datasets/imagenet --recursive --evict

URL is a path under one of the daemon's remotes, as it names them (`igtcache stats`
lists them), or NAME:PREFIX for its remote NAME. Exit status: 0 when every file was
warmed (checked, dropped), 1 when something failed (each failure is named), 2 on bad usage."""


class WarmError(Exception):
    """Something the user can fix; its message says what."""


@dataclass(frozen=True)
class Target:
    """A prefix of one of the daemon's remotes."""

    remote: str  # the daemon's name for the remote
    url: str  # the remote's URL
    prefix: str  # relative to the remote's root; "" for all of it

    def show(self, name: str = "") -> str:
        """The URL of ``name`` (relative to the remote's root), else of the prefix."""
        rel = name or self.prefix
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url


@dataclass
class Outcome:
    """What a warm did."""

    files: int = 0
    bytes: int = 0
    cached_before: int = 0  # bytes of the warmed files the node tiers held already
    held_after: int = 0  # bytes of them the node tiers hold once read (a warm-up only fills free room)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    seconds: float = 0.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Load a dataset into the node daemon's tiers (and its cluster tier, if it has "
        "one) by reading it through the daemon, with progress and a summary; or show how much of it each tier "
        "holds (--check), or drop it (--evict).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="s3://bucket/prefix (under a remote the daemon serves) "
                        "or NAME:PREFIX")
    parser.add_argument("--recursive", "-r", action="store_true", help="include files in subdirectories")
    parser.add_argument("--include", action="append", metavar="GLOB",
                        help="only files whose path under URL (or name) matches GLOB, e.g. '*.parquet' "
                        "(* also matches /); repeatable")
    parser.add_argument("--parallel", "-j", type=_positive, default=4, metavar="N",
                        help="files read at once (default 4)")
    parser.add_argument("--socket", help=f"the daemon's socket (default: {default_socket_path()})")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="print how much of it each tier holds; load nothing")
    action.add_argument("--evict", action="store_true", help="drop it from the node tiers")
    parser.add_argument("--verbose", "-v", action="store_true", help="with --check: a line per file")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


# ---------------------------------------------------------------------- what to warm

def resolve(remotes: dict[str, dict[str, Any]], url: str) -> Target:
    """The remote and prefix ``url`` names: a URL under a remote's root, or ``NAME:PREFIX``."""
    scheme, sep, rest = url.partition("://")
    if sep:
        wanted = rest.strip("/")
        holding = [(served["root"].strip("/"), name) for name, served in remotes.items()
                   if scheme in served["protocols"] and _under(wanted, served["root"].strip("/"))]
        if holding:
            root, name = max(holding, key=lambda held: len(held[0]))  # the innermost, if roots nest
            return Target(name, remotes[name]["url"], wanted[len(root):].strip("/"))
    else:
        name, _, prefix = url.partition(":")
        if name in remotes:
            return Target(name, remotes[name]["url"], prefix.strip("/"))
    served = ", ".join(f"{name}={r['url']}" for name, r in sorted(remotes.items()))
    raise WarmError(f"the daemon serves no remote holding {url}; it serves {served}: give a path under one "
                    "of those URLs, or NAME:PREFIX")


def _under(path: str, root: str) -> bool:
    return not root or path == root or path.startswith(root + "/")


def list_files(client: DaemonClient, target: Target, recursive: bool,
               include: list[str] | None) -> list[dict[str, Any]]:
    """The files under ``target`` (in subdirectories too if ``recursive``) that match ``include``,
    sorted by name; ``WarmError`` if there is nothing there or nothing matches."""
    try:
        pending = _children(client, target.prefix)
    except FileNotFoundError:
        raise WarmError(f"{target.show()} does not exist on the daemon's remote {target.remote} "
                        f"({target.url})") from None
    files, skipped = [], 0
    while pending:
        entry = pending.pop()
        if entry["type"] == "file":
            files.append(entry)
        elif entry["type"] == "directory" and recursive:
            pending += _children(client, entry["name"])
        elif entry["type"] == "directory":
            skipped += 1
    matching = sorted((e for e in files if _included(e["name"], target.prefix, include)), key=lambda e: e["name"])
    if not matching:
        what = f"no files matching {' or '.join(include)}" if include and files else "no files"
        hint = f" (it has {skipped} subdirector{'y' if skipped == 1 else 'ies'}: add --recursive)" if skipped else ""
        raise WarmError(f"{target.show()} holds {what}{hint}")
    return matching


def _children(client: DaemonClient, path: str) -> list[dict[str, Any]]:
    """The entries of directory ``path`` (a file: itself); some stores list a directory in itself."""
    return [e for e in client.ls(path) if e["name"] != path or e["type"] == "file"]


def _included(name: str, prefix: str, include: list[str] | None) -> bool:
    if not include:
        return True
    rel = name[len(prefix):].lstrip("/") if prefix and name.startswith(prefix) else name
    return any(fnmatch.fnmatchcase(rel, glob) or fnmatch.fnmatchcase(posixpath.basename(name), glob)
               for glob in include)


def node_capacity(stats: dict[str, Any]) -> int:
    """Bytes the node's tiers can hold, from ``Cache.stats()``: the disk tier's capacity where
    there is one (the memory tier holds a subset of its blocks), else the memory tier's."""
    tiers = stats["tiers"]
    return tiers["disk"]["capacity"] if "disk" in tiers else tiers["memory"]["capacity"]


def capacity_warning(total: int, capacity: int) -> str | None:
    """What to tell the user before warming ``total`` bytes into a node cache of ``capacity``."""
    if total <= capacity:
        return None
    return (f"warning: this warm ({format_size(total)}) is larger than the node's cache ({format_size(capacity)}); "
            "a warm-up only fills free room and never evicts what jobs use, so the rest is read but not kept")


# ---------------------------------------------------------------------- progress

class Progress:
    """Files and bytes done out of a total, with rate and ETA, on ``stream``: one line redrawn
    with ``\\r`` on a terminal (at most every ``redraw`` seconds), else a line every ``every``
    seconds. Thread-safe."""

    def __init__(self, files: int, total: int, stream: TextIO, *, tty: bool | None = None, every: float = 5.0,
                 redraw: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.files, self.total = files, total
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = redraw if self.tty else every
        self.clock = clock
        self.start = self._shown = clock()
        self.done_files = self.done_bytes = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int, files: int = 0) -> None:
        """Count ``nbytes`` more bytes and ``files`` more finished files."""
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            now = self.clock()
            if now - self._shown >= self.every:
                self._shown = now
                self._show(now)

    def note(self, message: str) -> None:
        """Print ``message`` on its own line, the progress line after it again."""
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + message + "\n")
            if self.tty:
                self._show(self.clock())
            self.stream.flush()

    def finish(self) -> None:
        """Show the final state and leave the line."""
        with self._lock:
            self._show(self.clock())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The progress as text at time ``now``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        share = min(1.0, self.done_bytes / self.total) if self.total else 1.0
        left = self.total - self.done_bytes
        eta = f"ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ("done" if left <= 0 else "ETA ?")
        bar = "#" * int(share * 20)
        return (f"[{bar:<20}] {self.done_files}/{self.files} files, {format_size(self.done_bytes)} of "
                f"{format_size(self.total)} ({share:.0%}), {format_size(rate)}/s, {eta}")

    def _show(self, now: float) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


# ---------------------------------------------------------------------- the three actions

def warm_file(client: DaemonClient, name: str, chunk: int, progress: Progress,
              stop: threading.Event) -> tuple[int, int]:
    """Read ``name`` through the daemon in chunks of ``chunk`` bytes; the bytes of it the node
    tiers held before and hold after."""
    held = client.residency(name)
    offset, size = 0, held["size"]
    while offset < size and not stop.is_set():
        got = len(client.read(name, offset, min(chunk, size - offset), job=JOB, hint=HINT))
        if got == 0:
            break  # the object shrank meanwhile
        offset += got
        progress.add(got)
    progress.add(0, files=1)
    after = client.residency(name)
    return max(held["memory"], held["disk"]), max(after["memory"], after["disk"])


def warm(client: DaemonClient, files: list[dict[str, Any]], parallel: int, progress: Progress) -> Outcome:
    """Warm ``files`` with ``parallel`` threads; a file that fails is reported and skipped, a daemon
    that goes away stops the warm (``DaemonUnavailable``)."""
    outcome = Outcome()
    chunk = client.remotes[client.remote_name]["max_read"]
    stop = threading.Event()
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="igtcache-warm")
    try:
        futures = {pool.submit(warm_file, client, f["name"], chunk, progress, stop): f for f in files}
        for future in concurrent.futures.as_completed(futures):
            entry = futures[future]
            try:
                before, after = future.result()
            except DaemonUnavailable:
                raise
            except (OSError, ValueError) as exc:
                outcome.failed.append((entry["name"], str(exc)))
                progress.note(f"{PROG}: failed: {entry['name']}: {exc}")
                continue
            outcome.files += 1
            outcome.bytes += entry["size"]
            outcome.cached_before += before
            outcome.held_after += after
    finally:
        stop.set()  # on an error or Ctrl-C, threads stop after their current chunk
        pool.shutdown(wait=True, cancel_futures=True)
    outcome.seconds = time.monotonic() - started
    return outcome


def summary(outcome: Outcome, target: Target) -> str:
    """One line on what a warm did (and one more per failed file)."""
    rate = outcome.bytes / outcome.seconds if outcome.seconds > 0 else 0.0
    loaded = max(0, outcome.held_after - outcome.cached_before)
    lines = [f"warmed {target.show()}: {_files(outcome.files)}, {format_size(outcome.bytes)} in "
             f"{outcome.seconds:.1f} s ({format_size(rate)}/s): {format_size(loaded)} loaded, "
             f"{format_size(outcome.cached_before)} already cached"]
    left_out = outcome.bytes - max(outcome.held_after, outcome.cached_before)
    if left_out > 0:
        lines[0] += (f", {format_size(left_out)} not kept: a warm-up only fills free room and never evicts "
                     "(`--evict` an old dataset to make room)")
    if outcome.failed:
        lines.append(f"{_files(len(outcome.failed))} failed (run again to retry them):")
        lines += [f"  {name}: {why}" for name, why in outcome.failed]
    return "\n".join(lines)


def check(client: DaemonClient, files: list[dict[str, Any]], target: Target, verbose: bool) -> str:
    """How much of ``files`` each node tier holds: totals, and a line per file if ``verbose``."""
    rows = [client.residency(f["name"]) for f in files]
    total = sum(r["size"] for r in rows)
    tiers = [t for t in ("memory", "disk") if t in client.stats()["tiers"]]
    lines = [f"{target.show()}: {_files(len(rows))}, {format_size(total)}"]
    for tier in tiers:
        held = sum(r[tier] for r in rows)
        whole = sum(1 for r in rows if r[tier] == r["size"])
        lines.append(f"  {tier:<7}{format_size(held):>11} ({_share(held, total)}), {whole} of {len(rows)} "
                     "files whole")
    if verbose:
        lines.append("  " + "".join(f"{t:>9}" for t in tiers) + f"{'size':>11}  name")
        lines += ["  " + "".join(f"{_share(r[t], r['size']):>9}" for t in tiers)
                  + f"{format_size(r['size']):>11}  {r['name']}" for r in rows]
    return "\n".join(lines)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "100.0%"


def evict(client: DaemonClient, files: list[dict[str, Any]], target: Target) -> str:
    """Drop ``files`` from the node tiers; what was dropped."""
    for entry in files:
        client.invalidate(entry["name"])
    return f"dropped {target.show()}: {_files(len(files))}, {format_size(sum(f['size'] for f in files))}"


# ---------------------------------------------------------------------- the command

def run(args: argparse.Namespace, client: DaemonClient, out: TextIO, err: TextIO) -> int:
    """The parsed command against the daemon ``client`` talks to; its exit status."""
    target = resolve(client.remotes, args.url)
    client = client.for_remote(target.remote)
    files = list_files(client, target, args.recursive, args.include)
    if args.check:
        print(check(client, files, target, args.verbose), file=out)
        return 0
    if args.evict:
        print(evict(client, files, target), file=out)
        return 0
    total = sum(f["size"] for f in files)
    warning = capacity_warning(total, node_capacity(client.stats()))
    if warning:
        print(f"{PROG}: {warning}", file=err, flush=True)
    progress = Progress(len(files), total, err)
    outcome = warm(client, files, args.parallel, progress)
    progress.finish()
    print(summary(outcome, target), file=out)
    return 1 if outcome.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    socket_path = args.socket or default_socket_path()
    client = None
    try:
        # Reads must reach the daemon for its tiers to fill; a short-circuit client would serve
        # what is already on disk itself.
        client = DaemonClient(socket_path, short_circuit=False)
        return run(args, client, sys.stdout, sys.stderr)
    except WarmError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except DaemonError as exc:
        advice = socket_advice(socket_path) if isinstance(exc, DaemonUnavailable) else None
        print(f"{PROG}: {exc}" + (f"; {advice}" if advice else ""), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # listing failed, or $IGTCACHE_DAEMON_TIMEOUT not understood
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
