"""Where LoRA adapters live: a local directory, any fsspec URL (through igtcache), or the node daemon.

Every source holds adapters in PEFT layout: ``<name>/adapter_config.json``
and ``<name>/adapter_model.safetensors``, and reads a whole file by path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DAEMON_PREFIX = "igtcache::"


@runtime_checkable
class AdapterSource(Protocol):
    """Reads whole files below the place adapters live."""

    description: str

    def read(self, path: str) -> bytes:
        """The bytes of ``path``; ``FileNotFoundError`` if it does not exist."""

    def close(self) -> None:
        """Release what the source opened."""


def check_name(name: str) -> str:
    """An adapter name is a relative path of plain components (``org/adapter`` is fine, ``..`` is not)."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a string, got {type(name).__name__}")
    parts = name.split("/")
    if not name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bad adapter name {name!r}")
    return name


class DirectorySource:
    """Adapters in a local directory, read straight from the file system."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.description = str(self.root)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def close(self) -> None:
        pass


class FsspecSource:
    """Adapters under ``root`` of an fsspec filesystem, read straight from it (no cache)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.description = f"{protocol}://{self.root}"

    @classmethod
    def from_url(cls, url: str, storage_options: dict | None = None) -> "FsspecSource":
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, root)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{path}")

    def close(self) -> None:
        pass


class CacheSource:
    """Adapters read through an ``igtcache.Cache`` or anything with its ``info``/``read`` (the daemon
    client), below ``prefix`` inside it."""

    def __init__(self, cache: Any, *, prefix: str = "", owned: bool = False, description: str | None = None) -> None:
        self.cache = cache
        self.prefix = prefix.strip("/")
        self.owned = owned
        self.description = description or repr(cache)

    def read(self, path: str) -> bytes:
        path = f"{self.prefix}/{path}" if self.prefix else path
        size = self.cache.info(path)["size"]
        data = self.cache.read(path, 0, size)
        if len(data) != size:
            raise OSError(f"{path!r} from {self.description}: read {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        if self.owned:
            self.cache.close()


def open_source(source: Any, cache_options: dict | None = None) -> AdapterSource:
    """The source for ``source``: an ``AdapterSource`` (read, close, description), a Cache-like object,
    ``"igtcache::<url>"`` (the node daemon), another fsspec URL (an embedded ``igtcache.Cache``
    with ``cache_options``), or a local directory."""
    if isinstance(source, AdapterSource):
        return source
    if hasattr(source, "read") and hasattr(source, "info"):
        return CacheSource(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot read adapters from {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith(DAEMON_PREFIX):
        return _daemon_source(text[len(DAEMON_PREFIX):])
    if "://" in text:
        from igtcache import Cache

        return CacheSource(Cache(text, **(cache_options or {})), owned=True, description=text)
    if not os.path.isdir(text):
        raise FileNotFoundError(f"adapter directory {text!r} does not exist")
    return DirectorySource(text)


def _daemon_source(url: str) -> AdapterSource:
    """The daemon (at ``$IGTCACHE_SOCKET`` or its default socket) remote whose URL holds ``url``."""
    try:
        from igtcache.daemon_client import DaemonClient
    except ImportError as exc:
        raise RuntimeError(
            f"reading adapters through the igtcache daemon ({DAEMON_PREFIX}{url}) needs igtcache.daemon_client, "
            "which is not available here; pass a local directory, an fsspec URL or an igtcache.Cache instead"
        ) from exc
    client = DaemonClient()
    wanted = url.rstrip("/")
    for name, remote in client.remotes.items():
        root = remote["url"].rstrip("/")
        if wanted == root or wanted.startswith(root + "/"):
            return CacheSource(client.for_remote(name), prefix=wanted[len(root):], owned=True,
                               description=f"{DAEMON_PREFIX}{url}")
    client.close()
    raise ValueError(f"the igtcache daemon at {client.socket_path} serves no remote holding {url!r}; "
                     f"it serves {sorted(r['url'] for r in client.remotes.values())}")
