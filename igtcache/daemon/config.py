"""What a daemon serves and where: remotes, tiers, socket, metrics port.

Built from ``igtcache serve``'s options, a TOML file (``--config``), or both
(options win). The memory and disk budgets are split evenly between remotes
unless a remote names its own.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from igtcache.cluster_url import parse_cluster_url
from igtcache.policies import LIVE_POLICIES
from igtcache.quotas import parse_quota
from igtcache.sizes import format_size, parse_size

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
#: Block sizes a daemon takes: whole pages (4 KiB) in this range. Smaller blocks cost a
#: request per few KiB and an index entry each; larger ones make every miss a long fetch.
MIN_BLOCK, MAX_BLOCK = 4 * KiB, 64 * MiB
#: ``--max-read`` range: below it a client splits reads into many requests; above it one
#: request could hold gigabytes.
MIN_MAX_READ, MAX_MAX_READ = 64 * KiB, 4 * GiB
#: Least ``--max-inflight`` unless it is given: room for many ordinary reads at once.
MIN_DEFAULT_INFLIGHT = 256 * MiB
MAX_GRACE = 24 * 3600.0
SOCKET_PATH_MAX = 107  # bytes in sun_path, less its terminating NUL


def default_socket_path() -> str:
    """``$IGTCACHE_SOCKET``, else ``$XDG_RUNTIME_DIR/igtcache/igtcache.sock``, else
    ``/tmp/igtcache-UID/igtcache.sock``."""
    if os.environ.get("IGTCACHE_SOCKET"):
        return os.environ["IGTCACHE_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "igtcache" if runtime else Path(f"/tmp/igtcache-{os.getuid()}")
    return str(base / "igtcache.sock")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/igtcache``, else ``~/.cache/igtcache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "igtcache")


@dataclass
class RemoteConfig:
    """One served remote: its name on the socket, URL, fsspec options and tier sizes."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int | None = None  # None: an even share of the daemon's budget
    disk_bytes: int | None = None


@dataclass
class DaemonConfig:
    remotes: list[RemoteConfig]
    socket: str = field(default_factory=default_socket_path)
    socket_mode: int = 0o600
    socket_group: str | None = None
    cache_dir: str | None = field(default_factory=default_cache_dir)  # None: memory only
    memory_bytes: int = 1 * GiB
    disk_bytes: int = 10 * GiB
    block_size: int = 4 * MiB
    policy: str = "igt"
    ttl: float = 30.0
    max_read: int = 256 * MiB
    max_inflight: int | None = None  # response bytes held at once; None: the larger of 2 x max_read and 256 MiB
    max_connections: int | None = None  # None: 1024, or fewer if the open-file limit is low
    grace: float = 30.0
    idle_timeout: float = 60.0  # seconds a connection may sit between requests
    frame_timeout: float = 10.0  # seconds a started request (or a new connection's handshake) has to arrive whole
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    trace_dir: str | None = None  # each remote's reads recorded as TRACE_DIR/NAME.csv
    cluster: str | None = None  # redis:// URL of the cluster tier shared by every node
    cluster_prefix: str = "igtcache"
    quotas: dict[str, int] = field(default_factory=dict)  # path prefix -> bytes it may hold in a remote's tiers

    def __post_init__(self) -> None:
        if not self.remotes:
            raise ValueError("no remote to serve: give --remote URL (or [remotes.NAME] in --config)")
        names = [r.name for r in self.remotes]
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(f"remote name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two remotes are named {duplicates[0]!r}; name them: --remote NAME=URL")
        self._check_sizes()
        self._check_times()
        self._check_service()

    def _check_sizes(self) -> None:
        bs = self.block_size
        if not (MIN_BLOCK <= bs <= MAX_BLOCK and bs % MIN_BLOCK == 0):
            raise ValueError(f"--block-size {bs} is not allowed: give a multiple of 4KiB from 4KiB to 64MiB "
                             "(e.g. 1MiB, or 4MiB for large sequential files)")
        for what, value in [("--memory", self.memory_bytes), ("--disk", self.disk_bytes),
                            *((f"memory of remote {r.name!r}", r.memory_bytes) for r in self.remotes),
                            *((f"disk of remote {r.name!r}", r.disk_bytes) for r in self.remotes)]:
            if value is not None and value < 0:
                raise ValueError(f"{what} must be a size of 0 or more, not {value}")
        for prefix, limit in self.quotas.items():
            if limit < 0:
                raise ValueError(f"--quota {prefix}={limit}: a quota must be a size of 0 or more")
        if not MIN_MAX_READ <= self.max_read <= MAX_MAX_READ:
            raise ValueError(f"--max-read {format_size(self.max_read)} is not allowed: give 64KiB to 4GiB "
                             "(clients split larger reads into requests of this size)")
        if self.max_inflight is not None and self.max_inflight < self.max_read:
            raise ValueError(f"--max-inflight {format_size(self.max_inflight)} must be at least --max-read "
                             f"({format_size(self.max_read)}), or no read of that size could ever be answered")

    def _check_times(self) -> None:
        if not (math.isfinite(self.ttl) and self.ttl >= 0):
            raise ValueError(f"--ttl must be a number of seconds, 0 or more, not {self.ttl}")
        if not (math.isfinite(self.grace) and 0 <= self.grace <= MAX_GRACE):
            raise ValueError(f"--grace must be a number of seconds from 0 to {MAX_GRACE:g}, not {self.grace}")
        if not (0 < self.idle_timeout < 1e6 and 0 < self.frame_timeout < 1e6):
            raise ValueError("--idle-timeout and --frame-timeout must be positive numbers of seconds, under 1e6")

    def _check_service(self) -> None:
        if self.policy not in LIVE_POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(LIVE_POLICIES)}")
        if not self.socket or len(os.fsencode(self.socket)) > SOCKET_PATH_MAX:
            raise ValueError(f"--socket must be a path of 1 to {SOCKET_PATH_MAX} bytes (a limit of Unix sockets); "
                             f"{self.socket!r} is {len(os.fsencode(self.socket))}")
        if not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"--socket-mode {self.socket_mode:o} is not a permission mode (0000 to 0777)")
        if self.socket_group is not None:
            group_id(self.socket_group)
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"--max-connections must be 1 or more, not {self.max_connections}")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be a TCP port from 1 to 65535, not {self.metrics_port}")
        if not self.metrics_host:
            raise ValueError("--metrics-host must be an address, e.g. 127.0.0.1")
        if self.cluster is not None:
            parse_cluster_url(self.cluster)
        if not self.cluster_prefix:
            raise ValueError("--cluster-prefix must not be empty")

    @property
    def inflight_bytes(self) -> int:
        """Response bytes the daemon holds at once: ``max_inflight``, else the larger of twice
        ``max_read`` and ``MIN_DEFAULT_INFLIGHT``."""
        if self.max_inflight is not None:
            return self.max_inflight
        return max(2 * self.max_read, MIN_DEFAULT_INFLIGHT)

    def tier_sizes(self, remote: RemoteConfig) -> tuple[int, int]:
        """Memory and disk bytes for one remote: its own, else an even share of what is left."""
        shares = []
        for attr, total in (("memory_bytes", self.memory_bytes), ("disk_bytes", self.disk_bytes)):
            own = getattr(remote, attr)
            if own is not None:
                shares.append(own)
                continue
            claimed = sum(getattr(r, attr) for r in self.remotes if getattr(r, attr) is not None)
            unnamed = sum(1 for r in self.remotes if getattr(r, attr) is None)
            shares.append(max(0, total - claimed) // unnamed)
        return shares[0], shares[1]

    def remote_trace_path(self, remote: RemoteConfig) -> str | None:
        return None if self.trace_dir is None else os.path.join(self.trace_dir, f"{remote.name}.csv")

    def remote_cache_dir(self, remote: RemoteConfig) -> str | None:
        if self.cache_dir is None or self.tier_sizes(remote)[1] == 0:
            return None
        return os.path.join(self.cache_dir, remote.name)


def name_for(url: str) -> str:
    """A remote's default name: its bucket and prefix with other characters as ``-``."""
    _protocol, path = fsspec.core.split_protocol(url)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path or url).strip("-.")
    return name[:64] or "default"


def parse_remote(text: str, storage_options: dict | None = None) -> RemoteConfig:
    """``NAME=URL`` or ``URL`` (named after its bucket and prefix); an ``=`` after ``://`` is the URL's."""
    name, sep, url = text.partition("=")
    if not sep or "://" in name:
        name, url = name_for(text), text
    return RemoteConfig(name=name, url=url, storage_options=dict(storage_options or {}))


def load_toml(path: str) -> dict[str, Any]:
    """A config file's settings as ``DaemonConfig`` keyword arguments.

    Keys: ``socket``, ``socket_mode`` (e.g. ``"0660"``), ``socket_group``,
    ``cache_dir``, ``memory``, ``disk``, ``block_size``, ``policy``, ``ttl``,
    ``max_read``, ``max_inflight``, ``max_connections``, ``grace``, ``idle_timeout``, ``frame_timeout``,
    ``metrics_port``, ``metrics_host``,
    ``cluster``, ``cluster_prefix``, a ``[quota]`` table of ``"PREFIX" = "SIZE"``, and one
    ``[remotes.NAME]`` table per remote with ``url`` and optional
    ``storage_options``, ``memory``, ``disk``.
    """
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    out: dict[str, Any] = {}
    sizes = {"memory": "memory_bytes", "disk": "disk_bytes", "block_size": "block_size", "max_read": "max_read",
             "max_inflight": "max_inflight"}
    for key, value in raw.items():
        if key == "remotes":
            continue
        if key == "quota":
            if not isinstance(value, dict):
                raise ValueError(f'{path}: quota must be a table of "PREFIX" = "SIZE"')
            out["quotas"] = dict(parse_quota(f"{prefix}={size}") for prefix, size in value.items())
            continue
        if key in sizes:
            out[sizes[key]] = parse_size(value)
        elif key == "socket_mode":
            out[key] = parse_mode(str(value))
        elif key in ("socket", "socket_group", "cache_dir", "policy", "metrics_host", "cluster", "cluster_prefix"):
            out[key] = str(value)
        elif key in ("ttl", "grace", "idle_timeout", "frame_timeout"):
            out[key] = float(value)
        elif key in ("metrics_port", "max_connections"):
            out[key] = int(value)
        else:
            raise ValueError(f"{path}: unknown setting {key!r}")
    remotes = []
    for name, table in (raw.get("remotes") or {}).items():
        if not isinstance(table, dict) or "url" not in table:
            raise ValueError(f"{path}: [remotes.{name}] needs a url")
        remotes.append(RemoteConfig(
            name=name, url=table["url"], storage_options=dict(table.get("storage_options") or {}),
            memory_bytes=parse_size(table["memory"]) if "memory" in table else None,
            disk_bytes=parse_size(table["disk"]) if "disk" in table else None,
        ))
    out["remotes"] = remotes
    return out


def group_id(group: str) -> int:
    """The gid of a group given by name or number; ``ValueError`` if no group has that name."""
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group {group!r}: no such group on this machine") from None


def parse_mode(text: str) -> int:
    """An octal permission mode such as ``0600`` or ``660``, for the socket."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal mode: {text!r} (e.g. 0600, 0660)") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {text!r} is out of range")
    return mode
