"""``igtcache stats``: what the node daemon is doing, once or refreshed (``--watch``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from igtcache.cli_advice import socket_advice
from igtcache.daemon.config import default_socket_path
from igtcache.daemon_client import DaemonClient, DaemonError
from igtcache.sizes import format_size

EPILOG = """\
examples:
  igtcache stats                      # the daemon on $IGTCACHE_SOCKET or the default socket
  igtcache stats --watch 2            # refresh every 2 seconds until Ctrl-C
  igtcache stats --json | jq .remotes
  curl --unix-socket SOCKET http://x/metrics     # the same figures for Prometheus"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache stats", description="Print the daemon's tiers, hit ratios, remote traffic, jobs and "
        "access streams (with their patterns and shares, once the engine reports them).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", help=f"the daemon's socket (default: {default_socket_path()})")
    parser.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    return parser


def _ratio(value: float) -> str:
    return f"{value:6.1%}"


def render(stats: dict[str, Any]) -> str:
    """The stats of ``DaemonClient.daemon_stats()`` as text."""
    daemon = stats["daemon"]
    requests = sum(daemon["requests"].values())
    errors = sum(daemon["errors"].values())
    lines = [f"igtcache daemon pid {daemon['pid']}, up {daemon['uptime_s']:.0f} s, "
             f"{daemon['connections']} of {daemon['max_connections']} connections, "
             f"{format_size(daemon['inflight_bytes'])} in flight, {requests} requests ({errors} errors)"]
    for name, s in sorted(stats["remotes"].items()):
        lines += ["", f"remote {name}  policy {s.get('policy', '?')}, blocks of {format_size(s.get('block_size', 0))}"]
        for tier, t in sorted((s.get("tiers") or {}).items()):
            used = t["bytes"] / t["capacity"] if t["capacity"] else 0.0
            lines.append(f"  {tier:<8} {format_size(t['bytes']):>10} of {format_size(t['capacity']):>10} "
                         f"({used:5.1%}), {t['blocks']} blocks")
        for prefix, q in sorted((s.get("quotas") or {}).items()):
            used = q["used"] / q["limit"] if q["limit"] else 0.0
            lines.append(f"  quota {prefix or '(all)'}: {format_size(q['used'])} of {format_size(q['limit'])} "
                         f"({used:5.1%}), {q['blocks']} blocks, {q['evictions']} evicted by the cap")
        lines.append(f"  reads {s.get('reads', 0)}  hit ratio {_ratio(s.get('hit_ratio', 0))}  byte hit ratio "
                     f"{_ratio(s.get('byte_hit_ratio', 0))}  remote {format_size(s.get('remote_bytes', 0))} "
                     f"in {s.get('remote_fetches', 0)} fetches")
        cluster = s.get("cluster")
        if cluster:
            lines.append(f"  cluster  {cluster['state']}: {cluster['hits']} hits, {cluster['misses']} misses, "
                         f"served {format_size(s.get('cluster_bytes', 0))}, published "
                         f"{format_size(cluster['publish_bytes'])} ({cluster['publish_dropped']} dropped), "
                         f"{cluster['corrupt']} bad values, {cluster['errors']} errors")
        prefetch = s.get("prefetch") or {}
        if prefetch.get("issued"):
            lines.append(f"  prefetch {prefetch['issued']} blocks, {prefetch.get('used', 0)} used, "
                         f"{format_size(prefetch.get('wasted_bytes', 0))} wasted")
        problems = {k: s[k] for k in ("evictions", "corruptions", "lost_blocks", "disk_write_errors", "remote_errors")
                    if s.get(k)}
        if problems:
            lines.append("  " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items()))
        jobs = s.get("jobs") or {}
        if jobs:
            lines.append(f"  {'job':<24}{'reads':>9}{'hit ratio':>11}{'byte hits':>11}{'requested':>12}")
            for job, j in sorted(jobs.items(), key=lambda item: -item[1].get("bytes_requested", 0)):
                lines.append(f"  {job[:23]:<24}{j['reads']:>9}{_ratio(j['hit_ratio']):>11}"
                             f"{_ratio(j['byte_hit_ratio']):>11}{format_size(j['bytes_requested']):>12}")
        streams = s.get("streams")
        if streams:
            lines.append(f"  streams, most recently active first\n    {'job':<16}{'level':<10}{'pattern':<12}"
                         f"{'share':>7}{'reads/s':>9}{'bytes/s':>12}  path")
            lines += [f"    {_stream(stream)}" for stream in streams]
    return "\n".join(lines)


def _stream(stream: Any) -> str:
    """One access stream: who reads, at which level of the tree, its pattern, share, rates and path."""
    if not isinstance(stream, dict):
        return str(stream)
    share = stream.get("share")
    share_text = f"{share:.1%}" if isinstance(share, (int, float)) else "-"
    job = "*" if stream.get("job") is None else str(stream["job"])
    path = stream.get("path") or "/"
    if stream.get("region") is not None:
        path += f" [{stream['region']}]"
    pattern = stream.get("label", stream.get("pattern", "unknown"))
    return (f"{job[:15]:<16}{str(stream.get('level', '')):<10}{pattern:<12}{share_text:>7}"
            f"{stream.get('rate') or 0:>9.1f}{format_size(stream.get('byte_rate') or 0) + '/s':>12}  {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    socket_path = args.socket or default_socket_path()
    client = None
    try:
        client = DaemonClient(socket_path)
        while True:
            stats = client.daemon_stats()
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the terminal
                print(render(stats), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except DaemonError as exc:
        advice = socket_advice(socket_path)
        print(f"igtcache stats: {exc}" + (f"\nigtcache stats: {advice}" if advice else ""), file=sys.stderr)
        return 1
    except ValueError as exc:  # $IGTCACHE_DAEMON_TIMEOUT or $IGTCACHE_DAEMON_UID not understood
        print(f"igtcache stats: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if client is not None:
            client.close()
