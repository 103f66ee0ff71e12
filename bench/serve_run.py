"""One run of the serving benchmark: a model, adapters on a local S3 server, a daemon, every contender.

``run(options)`` builds the model (``serve_model``), writes the adapters with
PEFT and uploads them to a local S3 server (moto), generates the workload
(``serve_workloads``), computes each request's reference logits (PEFT, full
prefill), times the serving loop on a sample of requests with full prefills
(adapters from local disk, nothing reused) and sets the arrival rate to
``options.load`` over that mean (a load of 0.7 keeps a server that reuses
nothing, and reads adapters for free, busy 70% of the time), then serves
every request on every contender and compares each first token's logits
with the reference.

Every contender except no-cache reads adapters through the node daemon
(``igtcache serve``) over the bucket, each through a remote of its own (so
one contender's reads never warm another's); no-cache reads S3 directly.

Contenders take turns request by request, each on its own ``Timeline``
(idle time skipped, paused while the others run), so that a busy machine
slows all of them alike; ``real_time`` runs them one after another in wall
time instead, sleeping until each arrival.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igtcache.bench.serve_contenders import CountingSource, FlatPools, NoCache
from igtcache.bench.serve_model import ModelSpec, PeftReference, upload, write_adapters
from igtcache.bench.serve_workloads import generate, scaled
from igtcache.clients.adapter_source import CacheSource, DirectorySource, FsspecSource
from igtcache.clients.kv_blocks import block_bytes
from igtcache.clients.kv_tree import chain_hashes
from igtcache.clients.lora_kv import LoraKVCache
from igtcache.clients.lora_serving import (
    LoraServer, Replay, Request, Timeline, WallClock, model_fingerprint, ttft_summary,
)

MiB = 1 << 20
BUCKET = "igtcache-serve"
CONTENDERS = {
    "no-cache": "adapter read from S3 on every request, full prefill",
    "vllm-style": "LRU adapters in a fixed share of HBM, LRU prefix KV in the rest (HBM only), LRU host adapter cache",
    "slora-style": "one unified HBM pool of adapters and prefix KV, LRU, no dependency tree; LRU host adapter cache",
    "igtcache": "LoraKVCache: dependency tree + cost model, HBM and host pools",
    "igtcache-lru": "ablation: the dependency tree with LRU in place of the cost model",
    "igtcache-no-tree": "ablation: the cost model with no dependency tree (unified pools, KV to host)",
}
# Requests timed to find the model's capacity for full prefills.
CALIBRATION_SAMPLE = 64
# Logits with restored KV must equal the full prefill's within this, relative to the largest logit.
TOLERANCE = 1e-5


@dataclass
class Options:
    workload: str = "chat"
    requests: int = 400
    adapters: int = 100
    zipf: float = 1.0
    load: float = 0.7
    hbm_bytes: int = 32 * MiB
    host_bytes: int = 128 * MiB
    block_tokens: int = 16
    vllm_adapter_share: float = 0.2
    window_requests: float = 25.0
    contenders: tuple[str, ...] = tuple(CONTENDERS)
    real_time: bool = False
    device: str = "cpu"
    seed: int = 0
    spec: ModelSpec = field(default_factory=ModelSpec)


@dataclass
class Contender:
    name: str
    store: object
    source: CountingSource
    replay: Replay
    remote: str | None
    adapter_misses: int = 0
    mismatches: int = 0
    max_logit_error: float = 0.0


def run(options: Options) -> dict:
    """Every figure of one run, as a dict (see ``bench.serve`` for its keys)."""
    from igtcache.daemon.process import DaemonProcess
    from igtcache.local_s3 import LocalS3

    model = options.spec.build(options.device)
    fingerprint = model_fingerprint(model)
    with tempfile.TemporaryDirectory(prefix="igtcache-serve-") as scratch, LocalS3() as s3:
        local = Path(scratch) / "adapters"
        ranks = write_adapters(model, local, options.adapters, seed=options.seed)
        s3.create_bucket(BUCKET)
        fs = s3.filesystem()
        uploaded = upload(fs, local, f"{BUCKET}/adapters")
        requests = generate(options.workload, requests=options.requests, adapters=list(ranks), zipf=options.zipf,
                            vocab=options.spec.vocab, seed=options.seed)
        reference = PeftReference(model, local).logits([(r.adapter, r.prompt) for r in requests])
        mean_prefill, prefill_token_s = _calibrate(model, fingerprint, local, requests, options)
        rate = options.load / mean_prefill
        requests = scaled(requests, rate)
        remotes = [f"c{i}" for i, name in enumerate(options.contenders) if name != "no-cache"]
        args = [a for r in remotes for a in ("--remote", f"{r}=s3://{BUCKET}/adapters")]
        args += ["--storage-options", json.dumps(s3.storage_options()), "--memory", f"{64 * max(1, len(remotes))}MiB",
                 "--disk", "0", "--block-size", "1MiB", "--ttl", "3600", "--log-level", "error"]
        with DaemonProcess(Path(scratch) / "d.sock", args) as daemon:
            with ExitStack() as stack:
                contenders = _contenders(options, model, fingerprint, daemon.socket_path, fs, rate, prefill_token_s,
                                         stack)
                _serve(contenders, requests, reference, options.real_time)
            s3_bytes = _s3_bytes(daemon.socket_path, contenders)
    duration = requests[-1].arrival
    return {
        "logit_mismatches": sum(c.mismatches for c in contenders),
        "contenders": {c.name: _figures(c, s3_bytes) for c in contenders},
        "workload": {
            "kind": options.workload, "requests": len(requests), "adapters": options.adapters, "zipf": options.zipf,
            "rate_per_s": rate, "load": options.load, "duration_s": duration,
            "mean_prompt_tokens": statistics.fmean(len(r.prompt) for r in requests),
            "mean_full_prefill_s": mean_prefill, "adapter_bytes_uploaded": uploaded,
            "kv_bytes_per_block": block_bytes(model.config, options.block_tokens),
            "distinct_kv_bytes": _distinct_kv(requests, options.block_tokens) * block_bytes(model.config,
                                                                                             options.block_tokens),
        },
        "budgets": {"hbm_bytes": options.hbm_bytes, "host_bytes": options.host_bytes,
                    "vllm_adapter_share": options.vllm_adapter_share},
        "model": {"layers": options.spec.layers, "hidden": options.spec.hidden, "vocab": options.spec.vocab,
                  "device": options.device, "threads": torch.get_num_threads()},
        "clock": "wall time, one contender after another" if options.real_time
        else "wall time while serving, idle time skipped, contenders taking turns",
    }


def _calibrate(model, fingerprint: str, adapters: Path, requests: list[Request], options: Options) -> tuple[float, float]:
    """The mean time the serving loop takes to serve a request with a full prefill (adapter from local disk,
    nothing reused), over an evenly spaced sample, and the marginal prefill time per token."""
    sample = requests[::max(1, len(requests) // CALIBRATION_SAMPLE)]
    store = NoCache(DirectorySource(adapters), device=options.device, block_tokens=options.block_tokens,
                    model_id=fingerprint)
    server = LoraServer(model, store)
    server.serve(sample[0].adapter, sample[0].prompt)  # warm-up
    seconds = []
    for request in sample:
        result = server.serve(request.adapter, request.prompt)
        seconds.append(result.finished - result.started)
    slope = np.polyfit([len(r.prompt) for r in sample], seconds, 1)[0] if len(sample) > 1 else 0.0
    return statistics.fmean(seconds), max(float(slope), 1e-7)


def _contenders(options: Options, model, fingerprint: str, socket: str, fs, rate: float,
                prefill_token_s: float, stack: ExitStack) -> list[Contender]:
    from igtcache.daemon_client import DaemonClient

    common = dict(device=options.device, block_tokens=options.block_tokens, model_id=fingerprint)
    sized = dict(hbm_bytes=options.hbm_bytes, host_bytes=options.host_bytes)
    costs = dict(window=options.window_requests / rate, prefill_token_s=prefill_token_s)
    contenders = []
    for i, name in enumerate(options.contenders):
        clock = WallClock() if options.real_time else Timeline()
        remote = None if name == "no-cache" else f"c{i}"
        if remote is None:
            inner = FsspecSource(fs, f"{BUCKET}/adapters")
        else:
            inner = CacheSource(DaemonClient(socket, remote_name=remote), owned=True, description=f"daemon remote {remote}")
        source = CountingSource(inner)
        stack.callback(source.close)
        if name == "no-cache":
            store = NoCache(source, **common)
        elif name in ("vllm-style", "slora-style"):
            share = options.vllm_adapter_share if name == "vllm-style" else None
            store = FlatPools(source, **common, **sized, clock=clock, adapter_share=share, kv_on_host=False,
                              ranking="lru")
        elif name == "igtcache-no-tree":
            store = FlatPools(source, **common, **sized, clock=clock, kv_on_host=True, ranking="cost", **costs)
        else:
            kv_bytes = block_bytes(model.config, options.block_tokens)
            store = LoraKVCache(source, **common, **sized, **costs, clock=clock, host_block_bytes=kv_bytes,
                                ranking="lru" if name == "igtcache-lru" else "cost")
            stack.callback(store.close)
        contenders.append(Contender(name, store, source, Replay(LoraServer(model, store, clock)), remote))
    return contenders


def _serve(contenders: list[Contender], requests: list[Request], reference: list[torch.Tensor],
           real_time: bool) -> None:
    """Every request on every contender: in turns on paused timelines, or one contender after another."""
    if real_time:
        for contender in contenders:
            contender.replay.clock.start()
            for request, expected in zip(requests, reference):
                _step(contender, request, expected)
        return
    for contender in contenders:
        contender.replay.clock.start()
        contender.replay.clock.pause()
    for i, (request, expected) in enumerate(zip(requests, reference)):
        first = i % len(contenders)  # no contender always runs right after another
        for contender in contenders[first:] + contenders[:first]:
            contender.replay.clock.resume()
            _step(contender, request, expected)
            contender.replay.clock.pause()


def _step(contender: Contender, request: Request, expected: torch.Tensor) -> None:
    files = contender.source.files
    result = contender.replay.step(request).result
    contender.adapter_misses += contender.source.files > files
    error = float((result.logits - expected).abs().max())
    contender.max_logit_error = max(contender.max_logit_error, error)
    if error > TOLERANCE * max(1.0, float(expected.abs().max())) or result.token != int(expected.argmax()):
        contender.mismatches += 1


def _s3_bytes(socket: str, contenders: list[Contender]) -> dict[str, int]:
    """Bytes each contender's adapter reads took from S3 (through its daemon remote, or directly)."""
    from igtcache.daemon_client import DaemonClient

    out = {}
    for contender in contenders:
        if contender.remote is None:
            out[contender.name] = contender.source.bytes
        else:
            with DaemonClient(socket, remote_name=contender.remote) as client:
                out[contender.name] = client.stats()["remote_bytes"]
    return out


def _figures(contender: Contender, s3_bytes: dict[str, int]) -> dict:
    served = contender.replay.served
    return {
        **ttft_summary(served),
        "adapter_hit_ratio": 1 - contender.adapter_misses / len(served),
        "source_bytes": contender.source.bytes,
        "s3_bytes": s3_bytes[contender.name],
        "service_mean_s": statistics.fmean(s.result.finished - s.result.started for s in served),
        "busy": sum(s.result.finished - s.result.started for s in served) / served[-1].result.finished,
        "logit_mismatches": contender.mismatches,
        "max_logit_error": contender.max_logit_error,
    }


def _distinct_kv(requests: list[Request], block_tokens: int) -> int:
    """Distinct KV blocks the prompts produce (per adapter and prefix)."""
    return len({(r.adapter, key) for r in requests for key in chain_hashes(r.prompt, block_tokens)})
