"""Cluster URLs: ``redis://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][?OPTION=VALUE&...]``.

``rediss://`` means TLS. The options are TLS settings passed to redis-py:
``ssl_ca_certs`` (a PEM file of CAs to trust, e.g. a private CA's),
``ssl_certfile`` and ``ssl_keyfile`` (a client certificate),
``ssl_cert_reqs`` (``required``, ``optional`` or ``none``) and
``ssl_check_hostname`` (``true``/``false``). User and password are
percent-decoded, so ``p%40ss`` is ``p@ss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

DEFAULT_PORT = 6379
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class ClusterURL:
    """The parts of a cluster URL: startup nodes, credentials, TLS and its options."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str | bool] = field(default_factory=dict)

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        user = f"{self.username or ''}:***@" if self.password is not None else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{'rediss' if self.tls else 'redis'}://{user}{hosts}"


def _node(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:PORT
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in cluster URL {url!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad node {text!r} in cluster URL {url!r} (expected HOST:PORT)")
    return host, port


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse a cluster URL; ``ValueError`` names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ValueError(f"cluster URL must start with redis:// or rediss://, got {url!r}")
    rest, _, query = rest.partition("?")
    netloc = rest.rstrip("/")
    if "/" in netloc:
        raise ValueError(f"a cluster URL has no database path (Redis Cluster has database 0 only): {url!r}")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(part, url) for part in hosts.split(",") if part)
    if not nodes:
        raise ValueError(f"cluster URL names no node: {url!r}")
    options: dict[str, str | bool] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _TLS_OPTIONS:
            raise ValueError(f"unknown option {name!r} in cluster URL (known: {', '.join(_TLS_OPTIONS)})")
        if scheme != "rediss":
            raise ValueError(f"option {name!r} needs a rediss:// (TLS) URL")
        if name == "ssl_check_hostname":
            if value.lower() not in _BOOLEANS:
                raise ValueError(f"ssl_check_hostname must be true or false, got {value!r}")
            options[name] = _BOOLEANS[value.lower()]
        else:
            options[name] = value
    return ClusterURL(nodes, username, password, scheme == "rediss", options)
