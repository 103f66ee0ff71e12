"""What a daemon serves and where: remotes, tiers, socket, metrics port.

Built from ``igtcache serve``'s options, a TOML file (``--config``), or both
(options win). The memory and disk budgets are split evenly between remotes
unless a remote names its own.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from igtcache.sizes import parse_size

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MiB = 1 << 20
GiB = 1 << 30


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
    grace: float = 30.0
    idle_timeout: float = 60.0  # seconds a connection may sit between requests
    frame_timeout: float = 10.0  # seconds a started request (or a new connection's handshake) has to arrive whole
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    trace_dir: str | None = None  # each remote's reads recorded as TRACE_DIR/NAME.csv
    cluster: str | None = None  # redis:// URL of the cluster tier shared by every node
    cluster_prefix: str = "igtcache"

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
        if self.block_size <= 0 or self.max_read <= 0:
            raise ValueError("block size and max read must be positive")
        if not (0 < self.idle_timeout < 1e6 and 0 < self.frame_timeout < 1e6):
            raise ValueError("idle and frame timeouts must be positive numbers of seconds, under 1e6")

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
    ``max_read``, ``grace``, ``idle_timeout``, ``frame_timeout``, ``metrics_port``, ``metrics_host``,
    ``cluster``, ``cluster_prefix``, and one
    ``[remotes.NAME]`` table per remote with ``url`` and optional
    ``storage_options``, ``memory``, ``disk``.
    """
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    out: dict[str, Any] = {}
    sizes = {"memory": "memory_bytes", "disk": "disk_bytes", "block_size": "block_size", "max_read": "max_read"}
    for key, value in raw.items():
        if key == "remotes":
            continue
        if key in sizes:
            out[sizes[key]] = parse_size(value)
        elif key == "socket_mode":
            out[key] = parse_mode(str(value))
        elif key in ("socket", "socket_group", "cache_dir", "policy", "metrics_host", "cluster", "cluster_prefix"):
            out[key] = str(value)
        elif key in ("ttl", "grace", "idle_timeout", "frame_timeout"):
            out[key] = float(value)
        elif key == "metrics_port":
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


def parse_mode(text: str) -> int:
    """An octal permission mode such as ``0600`` or ``660``, for the socket."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal mode: {text!r} (e.g. 0600, 0660)") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {text!r} is out of range")
    return mode
