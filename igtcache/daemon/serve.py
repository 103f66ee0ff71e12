"""``igtcache serve``: run the node daemon."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from igtcache.daemon.config import (
    DaemonConfig, default_cache_dir, default_socket_path, load_toml, parse_mode, parse_quota, parse_remote,
)
from igtcache.daemon.server import Daemon, StartError
from igtcache.policies import LIVE_POLICIES
from igtcache.sizes import size_argument

DESCRIPTION = """\
Run the node daemon: one cache shared by every job on this machine.

It serves each remote (an S3 bucket or prefix, or any fsspec URL) through one
igtcache.Cache with a memory tier and an LMDB disk tier that survives
restarts, on a Unix socket that only this user can use (mode 0600) unless
--socket-mode/--socket-group say otherwise. Clients find the socket through
--socket or $IGTCACHE_SOCKET: the fsspec protocol igtcache:: attaches to it,
and without a daemon runs the same engine in-process.

The socket speaks HTTP (try: curl --unix-socket SOCKET http://x/v1/stats) and
a binary protocol for reads. SIGTERM or Ctrl-C stops it cleanly: in-flight
reads get --grace seconds, and the disk tier is closed intact.

On a shared node: the socket's directory must not be writable by other users
(unless sticky, like /tmp), clients check that the daemon runs as themselves
or root (or as $IGTCACHE_DAEMON_UID), at most --max-connections are served at
once and --max-inflight bytes of responses held; docs/security.md has the rest."""

EPILOG = f"""\
examples:
  igtcache serve --remote s3://my-bucket/datasets
  igtcache serve --remote train=s3://bucket/train --remote eval=s3://bucket/eval \\
                 --memory 8GiB --disk 500GiB --cache-dir /nvme/igtcache
  igtcache serve --remote s3://bucket --storage-options '{{"endpoint_url": "http://127.0.0.1:9000"}}'
  igtcache serve --config /etc/igtcache.toml --metrics-port 9464
  igtcache stats --watch                    # what the daemon is doing

defaults on this machine:
  --socket     {default_socket_path()}
  --cache-dir  {default_cache_dir()}

config file (TOML; command-line options win):
  socket = "/run/igtcache/igtcache.sock"
  memory = "8GiB"
  disk = "500GiB"
  [remotes.train]
  url = "s3://bucket/train"
  disk = "400GiB"                # this remote's own share
  storage_options = {{ anon = false }}"""


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache serve", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--remote", action="append", default=[], metavar="[NAME=]URL",
                        help="a remote to serve, repeatable; named after its bucket and prefix unless NAME= is given")
    parser.add_argument("--storage-options", type=_json_object, metavar="JSON",
                        help="fsspec options (JSON object) for the --remote URLs, e.g. credentials or endpoint_url")
    parser.add_argument("--config", metavar="FILE", help="a TOML file of settings and [remotes.NAME] tables")
    parser.add_argument("--socket", help="Unix socket to serve on (default: $IGTCACHE_SOCKET, else shown below)")
    parser.add_argument("--socket-mode", type=parse_mode, metavar="MODE",
                        help="permission bits of the socket (default 0600: this user only; 0660 with --socket-group)")
    parser.add_argument("--socket-group", metavar="GROUP", help="group that owns the socket, for shared nodes")
    parser.add_argument("--cache-dir", help="where each remote's disk tier lives, one directory per remote")
    parser.add_argument("--memory", type=size_argument,
                        help="memory tier, split evenly between remotes; at most the machine's RAM (default 1GiB)")
    parser.add_argument("--disk", type=size_argument,
                        help="disk tier, split evenly between remotes (default 10GiB; 0 = memory only); refused if "
                             "larger than the cache dir's file system, a warning if larger than its free space")
    parser.add_argument("--block-size", type=size_argument,
                        help="cache block size, a multiple of 4KiB from 4KiB to 64MiB (default 4MiB)")
    parser.add_argument("--policy", choices=LIVE_POLICIES, help="eviction policy (default igt)")
    parser.add_argument("--ttl", type=float, metavar="SECONDS", help="seconds before an object's version is checked again (default 30)")
    parser.add_argument("--max-read", type=size_argument,
                        help="largest read or prefetch one request may ask for, 64KiB to 4GiB (default 256MiB); "
                             "clients split larger reads")
    parser.add_argument("--max-inflight", type=size_argument, metavar="SIZE",
                        help="response bytes held at once across all clients, at least --max-read (default: twice "
                             "--max-read, at least 256MiB); a read that finds no room waits up to --frame-timeout, "
                             "then fails with TimeoutError")
    parser.add_argument("--max-connections", type=int, metavar="N",
                        help="connections served at once (default 1024, fewer if the open-file limit is low); "
                             "past it a client is told the daemon is busy")
    parser.add_argument("--grace", type=float, metavar="SECONDS", help="seconds in-flight requests get at shutdown (default 30)")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        help="close a connection idle this long between requests (default 60)")
    parser.add_argument("--frame-timeout", type=float, metavar="SECONDS",
                        help="close a connection whose started request, or opening handshake, "
                             "is not whole after this long (default 10)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="also serve /metrics and /health over TCP on this port, 1-65535 (default: off)")
    parser.add_argument("--metrics-host", metavar="ADDRESS", help="address for --metrics-port (default 127.0.0.1)")
    parser.add_argument("--cluster", metavar="URL",
                        help="cluster tier shared by every node's daemon: redis://HOST:PORT[,HOST:PORT...] "
                             "(rediss:// for TLS, redis://USER:PASSWORD@... for ACL); `igtcache cluster up` "
                             "starts one on this machine")
    parser.add_argument("--cluster-prefix", metavar="PREFIX",
                        help="key prefix in the cluster, so deployments can share one Redis (default igtcache)")
    parser.add_argument("--quota", action="append", default=[], metavar="PREFIX=SIZE", type=_quota,
                        help="cap what one dataset or tenant may hold in each remote's node tiers, e.g. "
                             "train/imagenet=200GiB (repeatable; a path counts against the longest prefix "
                             "that holds it; past its cap its least recently read blocks leave)")
    parser.add_argument("--trace-dir", metavar="DIR",
                        help="record every read as a trace, DIR/NAME.csv per remote, for `igtcache bench replay`")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="default info")
    return parser


def _quota(text: str) -> tuple[str, int]:
    try:
        return parse_quota(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """Settings from --config, overridden by the command-line options given."""
    settings = load_toml(args.config) if args.config else {"remotes": []}
    settings["remotes"] += [parse_remote(text, args.storage_options) for text in args.remote]
    options = {
        "socket": args.socket, "socket_mode": args.socket_mode, "socket_group": args.socket_group,
        "cache_dir": args.cache_dir, "memory_bytes": args.memory, "disk_bytes": args.disk,
        "block_size": args.block_size, "policy": args.policy, "ttl": args.ttl, "max_read": args.max_read,
        "max_inflight": args.max_inflight, "max_connections": args.max_connections,
        "grace": args.grace, "idle_timeout": args.idle_timeout, "frame_timeout": args.frame_timeout,
        "metrics_port": args.metrics_port, "metrics_host": args.metrics_host,
        "trace_dir": args.trace_dir, "cluster": args.cluster, "cluster_prefix": args.cluster_prefix,
    }
    settings.update({key: value for key, value in options.items() if value is not None})
    if args.quota:
        settings["quotas"] = {**settings.get("quotas", {}), **dict(args.quota)}
    if args.socket_group and args.socket_mode is None and "socket_mode" not in settings:
        settings["socket_mode"] = 0o660
    return DaemonConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(format="igtcache: %(levelname)s: %(message)s")  # no-op under `igtcache`, which set it up
    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # a malformed request is the client's problem
    try:
        Daemon(config).run()
    except StartError as exc:
        print(f"igtcache serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
