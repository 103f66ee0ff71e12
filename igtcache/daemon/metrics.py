"""The daemon's stats in Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Cache.stats() counters, overall and per job: name in stats -> (metric, help).
_READ_COUNTERS = {
    "reads": ("reads_total", "Reads served."),
    "hits": ("hits_total", "Reads served wholly from cache."),
    "bytes_requested": ("requested_bytes_total", "Bytes requested by reads."),
    "bytes_from_cache": ("cache_bytes_total", "Requested bytes served from cache."),
}
_CACHE_COUNTERS = {
    "remote_fetches": ("remote_fetches_total", "Block fetches from the remote."),
    "remote_bytes": ("remote_bytes_total", "Bytes fetched from the remote, demand and prefetch."),
    "remote_seconds": ("remote_fetch_seconds_total", "Seconds from issue to arrival, summed over fetches."),
    "evictions": ("evictions_total", "Blocks evicted."),
    "corruptions": ("corruptions_total", "Blocks that failed their checksum."),
    "lost_blocks": ("lost_blocks_total", "Blocks the policy held but no tier had."),
    "disk_write_errors": ("disk_write_errors_total", "Disk tier writes that failed."),
    "remote_errors": ("remote_errors_total", "Remote fetches that failed after retries."),
}
_STREAM_HELP = {
    "rate": "Reads per second of an access stream.",
    "byte_rate": "Bytes per second of an access stream.",
    "accesses": "Reads seen in an access stream.",
    "samples": "Visits the stream's pattern label rests on.",
    "share": "The stream's share of the cache.",
}


class _Writer:
    """Samples grouped by metric, as the format requires, in first-seen order."""

    def __init__(self) -> None:
        self._metrics: dict[str, tuple[str, str, list[str]]] = {}

    def sample(self, name: str, kind: str, help_: str, value: float, **labels: Any) -> None:
        name = f"igtcache_{name}"
        _kind, _help, samples = self._metrics.setdefault(name, (kind, help_, []))
        label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        samples.append(f"{name}{{{label_text}}} {float(value)!r}" if labels else f"{name} {float(value)!r}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self._metrics.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_CLUSTER_COUNTERS = {
    "hits": "Blocks the cluster tier served.",
    "misses": "Cluster tier lookups that found nothing.",
    "corrupt": "Cluster values that failed their checksum (deleted, refetched).",
    "errors": "Cluster commands that failed or timed out.",
    "published": "Blocks published to the cluster tier.",
    "publish_bytes": "Bytes published to the cluster tier.",
    "publish_dropped": "Blocks not published: the publish queue was full.",
    "circuit_opens": "Times a cluster node's circuit opened.",
}


def render(stats: dict[str, Any]) -> str:
    """Prometheus text for ``Service.stats()``: daemon, remotes, tiers, jobs, and streams if reported."""
    out = _Writer()
    daemon = stats["daemon"]
    out.sample("up", "gauge", "1 while the daemon serves.", 1)
    out.sample("uptime_seconds", "gauge", "Seconds since the daemon started.", daemon["uptime_s"])
    out.sample("connections", "gauge", "Open client connections.", daemon["connections"])
    out.sample("max_connections", "gauge", "Most connections served at once (--max-connections).",
               daemon["max_connections"])
    out.sample("inflight_bytes", "gauge", "Response bytes held for clients right now.", daemon["inflight_bytes"])
    out.sample("max_inflight_bytes", "gauge", "Most response bytes held at once (--max-inflight).",
               daemon["max_inflight_bytes"])
    for op, n in sorted(daemon["requests"].items()):
        out.sample("requests_total", "counter", "Requests received, by operation.", n, op=op)
    for error, n in sorted(daemon["errors"].items()):
        out.sample("request_errors_total", "counter", "Requests answered with an error, by error type.", n, error=error)
    for remote, s in sorted(stats["remotes"].items()):
        for key, (metric, help_) in {**_READ_COUNTERS, **_CACHE_COUNTERS}.items():
            if key in s:
                out.sample(metric, "counter", help_, s[key], remote=remote)
        out.sample("hit_ratio", "gauge", "Hits over reads since start.", s.get("hit_ratio", 0), remote=remote)
        out.sample("byte_hit_ratio", "gauge", "Cached bytes over requested bytes since start.",
                   s.get("byte_hit_ratio", 0), remote=remote)
        for key, value in sorted((s.get("prefetch") or {}).items()):
            out.sample(f"prefetch_{key}_total", "counter", f"Prefetch {key.replace('_', ' ')}.", value, remote=remote)
        for tier, t in sorted((s.get("tiers") or {}).items()):
            out.sample("tier_bytes", "gauge", "Bytes held by a tier.", t["bytes"], remote=remote, tier=tier)
            out.sample("tier_capacity_bytes", "gauge", "A tier's bound.", t["capacity"], remote=remote, tier=tier)
            out.sample("tier_blocks", "gauge", "Blocks held by a tier.", t["blocks"], remote=remote, tier=tier)
        for prefix, q in sorted((s.get("quotas") or {}).items()):
            out.sample("quota_bytes", "gauge", "Bytes a quota's prefix holds in the node tiers.", q["used"],
                       remote=remote, prefix=prefix)
            out.sample("quota_limit_bytes", "gauge", "A quota's cap (--quota).", q["limit"], remote=remote, prefix=prefix)
            out.sample("quota_evictions_total", "counter", "Blocks a quota's cap evicted.", q["evictions"],
                       remote=remote, prefix=prefix)
        cluster = s.get("cluster")
        if cluster:
            for state in ("up", "degraded", "down"):
                out.sample("cluster_state", "gauge", "1 for the cluster tier's state (up, degraded, down).",
                           int(cluster["state"] == state), remote=remote, state=state)
            for key, help_ in _CLUSTER_COUNTERS.items():
                out.sample(f"cluster_{key}_total", "counter", help_, cluster[key], remote=remote)
        for job, j in sorted((s.get("jobs") or {}).items()):
            for key, (metric, help_) in _READ_COUNTERS.items():
                out.sample(f"job_{metric}", "counter", f"{help_} By job.", j[key], remote=remote, job=job)
        for stream in s.get("streams") or []:
            labels = {"remote": remote, "job": "*" if stream.get("job") is None else stream["job"],
                      "level": stream.get("level", ""), "path": stream.get("path", ""),
                      "region": stream.get("region") or "",
                      "pattern": stream.get("label", stream.get("pattern", "unknown"))}
            for key in ("rate", "byte_rate", "accesses", "samples", "share"):
                value = stream.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.sample(f"stream_{key}", "gauge", _STREAM_HELP[key], value, **labels)
    return out.text()
