"""Multi-LoRA serving: the dependency tree with the cost model against vLLM- and S-LoRA-style pools.

One run replays one workload (``lora_workload``: Zipf-popular adapters,
shared prompt prefixes and multi-turn conversations, bursty arrivals) through
three policies and reports, per policy: KV hit rate (prompt tokens whose KV
was cached), the fraction of HBM holding KV whose adapter is not in HBM, and
the estimated time to first token, from stated figures:

    TTFT = adapter bytes from the source / source bandwidth
         + bytes copied host<->device before prefill / host->device bandwidth
         + unmatched prompt tokens * prefill time per token

- vLLM-style and S-LoRA-style are byte-accounted simulations (``lora_baselines``).
  vLLM-style runs at ``--vllm-adapter-share`` (the baseline of the target) and,
  for reference, at several shares, of which the best in hindsight is shown.
- The dependency tree is the real ``LoraKVCache`` on the CPU fallback, with
  real PEFT adapters and real KV tensors, every size divided by ``--scale``
  (its cost model is given the stated bandwidths divided by the same factor,
  and the trace's timestamps as its clock). Its copies before prefill are its
  demand copies during ``acquire_adapter`` and ``match_prefix``; copies made
  while inserting the new KV run on the copy stream alongside the prefill and
  the swapper's prefetches between requests, so neither is counted; the
  report shows what share of the link all of its traffic took.

- The bound (``lora_baselines.Unbounded``) keeps every adapter and prefix ever
  seen in HBM: what no policy can beat on this workload, so a ratio near the
  bound's is limited by the workload, not by the policy.

Requests are served one at a time (no queueing, no batching). Target (issue
8): mean estimated TTFT <= 0.6x the vLLM-style baseline's. ``--sweep`` prints
the ratio at the given settings and at each variation in ``SWEEP`` (more HBM,
more adapters, MHA-sized KV) in one run.

On a CUDA machine it also measures host->device bandwidth through the pool
against a bare pinned ``copy_`` and a pageable ``.to()`` in the same run
(target: the pool >= 90% of the bare pinned figure); elsewhere it says that
part was skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from igtcache.bench.lora_baselines import Served, SloraStyle, Unbounded, VllmStyle
from igtcache.bench.lora_workload import Workload, generate
from igtcache.clients.lora_kv import LoraKVCache
from igtcache.cuda import PinnedBlockPool
from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
TTFT_TARGET = 0.6
# The vLLM-style baseline is also run at each of these adapter shares; the best is reported beside it.
HINDSIGHT_SHARES = (0.02, 0.05, 0.1, 0.25, 0.5)
# --sweep: the given settings, then each of these changes to them (the weak spots of the last review).
SWEEP = (("as given", {}), ("HBM 32 GiB", {"hbm": 32 << 30}), ("500 adapters", {"adapters": 500}),
         ("KV 512 KiB/token (MHA 7B)", {"kv_per_token": 512 << 10}))
BANDWIDTH_TARGET = 0.9
LAYERS = 32


class _TraceClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_adapters(workload: Workload, root: Path, scale: int) -> None:
    """PEFT directories whose packed size is each adapter's real size divided by ``scale``.

    The layers' A and B matrices are stacked into two tensors, so that
    alignment padding does not add to the scaled-down size.
    """
    from safetensors.torch import save_file

    for name, rank in workload.adapter_ranks.items():
        width, rest = divmod(workload.adapter_bytes[name], 2 * LAYERS * rank * 2 * scale)
        if rest or width == 0:
            raise ValueError(f"--scale {scale} does not divide adapter {name}'s size evenly; use a power of two <= 1024")
        tensors = {
            "base_model.model.layers.self_attn.lora_A.weight": torch.zeros(LAYERS, rank, width, dtype=torch.float16),
            "base_model.model.layers.self_attn.lora_B.weight": torch.zeros(LAYERS, width, rank, dtype=torch.float16),
        }
        (root / name).mkdir()
        save_file(tensors, str(root / name / "adapter_model.safetensors"))
        (root / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))


def run_baseline(policy, workload: Workload, figures: dict) -> dict:
    rows = []
    for i, request in enumerate(workload.requests):
        served: Served = policy.serve(request, workload.adapter_bytes[request.adapter])
        rows.append(_row(figures, request.prompt_len, served.matched_tokens, served.h2d_bytes, served.source_bytes))
        if i % 5 == 0:
            rows[-1]["orphan"] = policy.kv_without_adapter() / policy.hbm_bytes
    return _summary(policy.name, rows)


def run_tree(workload: Workload, figures: dict, scale: int, window: float, swap_interval: float) -> dict:
    clock = _TraceClock()
    block_bytes = figures["kv_bytes_per_token"] * workload.block_tokens // scale
    with tempfile.TemporaryDirectory(prefix="igtcache-lora-") as scratch:
        write_adapters(workload, Path(scratch), scale)
        cache = LoraKVCache(
            scratch, device="cpu", hbm_bytes=figures["hbm_bytes"] // scale, host_bytes=figures["host_bytes"] // scale,
            block_tokens=workload.block_tokens, prefill_token_s=figures["prefill_token_s"], window=window,
            swap_interval=swap_interval, host_block_bytes=max(256, block_bytes // 2), clock=clock,
            bandwidth={"h2d": figures["h2d_bw"] / scale, "d2h": figures["h2d_bw"] / scale,
                       "source": figures["source_bw"] / scale},
        )
        with cache:
            rows, counters = [], cache.counters
            for i, request in enumerate(workload.requests):
                clock.now = request.ts
                before = dict(counters)
                adapter = cache.acquire_adapter(request.adapter)
                match = cache.match_prefix(request.adapter, request.tokens[:request.prompt_len])
                moved = sum(counters[k] - before[k] for k in ("h2d_demand_bytes", "d2h_demand_bytes"))
                source = counters["source_bytes"] - before["source_bytes"]
                new = [torch.empty(block_bytes // 2, dtype=torch.float16) for _ in range(len(request.keys) - len(match.blocks))]
                cache.insert_kv(request.adapter, request.tokens, match.blocks + new)
                cache.release(match)
                cache.release(adapter)
                rows.append(_row(figures, request.prompt_len, match.tokens, moved * scale, source * scale))
                if i % 5 == 0:
                    rows[-1]["orphan"] = cache.tree.kv_bytes_without_adapter() / cache.hbm_bytes
            assert not cache.tree.violations()
            traffic = sum(counters[k] for k in ("h2d_demand_bytes", "h2d_prefetch_bytes", "d2h_demand_bytes",
                                                "d2h_background_bytes")) * scale
            stats = cache.stats()
    summary = _summary("dependency tree + cost model", rows)
    duration = workload.requests[-1].ts - workload.requests[0].ts
    summary["link_busy"] = traffic / figures["h2d_bw"] / max(duration, 1e-9)
    summary["prefetch_bytes"] = stats["h2d_prefetch_bytes"] * scale
    summary["kv_blocks_dropped"] = stats["kv_blocks_dropped"]
    return summary


def _row(figures: dict, prompt: int, matched: int, moved: int, source: int) -> dict:
    adapter_s = source / figures["source_bw"]
    copy_s = moved / figures["h2d_bw"]
    prefill_s = (prompt - matched) * figures["prefill_token_s"]
    return {"prompt": prompt, "matched": matched, "source_s": adapter_s, "copy_s": copy_s, "prefill_s": prefill_s,
            "ttft": adapter_s + copy_s + prefill_s}


def _summary(name: str, rows: list[dict]) -> dict:
    ttfts = sorted(r["ttft"] for r in rows)
    return {
        "policy": name,
        "kv_hit_rate": sum(r["matched"] for r in rows) / sum(r["prompt"] for r in rows),
        "kv_without_adapter": statistics.fmean(r["orphan"] for r in rows if "orphan" in r),
        "source_ms": 1e3 * statistics.fmean(r["source_s"] for r in rows),
        "copy_ms": 1e3 * statistics.fmean(r["copy_s"] for r in rows),
        "prefill_ms": 1e3 * statistics.fmean(r["prefill_s"] for r in rows),
        "ttft_ms": 1e3 * statistics.fmean(ttfts),
        "p99_ttft_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def measure_h2d(size: int, rounds: int) -> dict | None:
    """GB/s of host->device copies: through the pool, bare pinned ``copy_``, pageable ``.to()``; ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    target = torch.empty(size, dtype=torch.uint8, device=device)

    def timed(copy) -> float:
        copy()
        torch.cuda.synchronize()
        rates = []
        for _ in range(rounds):
            started = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            rates.append(size / (time.perf_counter() - started) / 1e9)
        return statistics.median(rates)

    with PinnedBlockPool(size, device=device, block_bytes=2 * MiB) as pool:
        buffer = pool.alloc(size)
        pool.write(buffer, np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8))
        through_pool = timed(lambda: pool.to_device(buffer, out=target))
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    bare = timed(lambda: target.copy_(pinned, non_blocking=True))
    pageable = torch.empty(size, dtype=torch.uint8)
    paged = timed(lambda: pageable.to(device))
    return {"size": size, "pool_gbps": through_pool, "bare_pinned_gbps": bare, "pageable_gbps": paged,
            "pool_vs_bare": through_pool / bare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igtcache bench lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests replayed (default 3000)")
    parser.add_argument("--adapters", type=int, default=100, help="distinct adapters (default 100)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (default 1.0)")
    parser.add_argument("--rate", type=float, default=10.0, help="calm arrival rate, requests/s (default 10; bursts 4x)")
    parser.add_argument("--trace", type=Path, help="arrival times to replay instead: one number of seconds per line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hbm", type=size_argument, default="16GiB", help="HBM for adapters and KV (default 16GiB)")
    parser.add_argument("--host", type=size_argument, default="64GiB", help="host memory pool (default 64GiB)")
    parser.add_argument("--vllm-adapter-share", type=float, default=0.25,
                        help="vLLM-style: fixed share of HBM for adapters (default 0.25)")
    parser.add_argument("--prefill-us", type=float, default=100.0, help="prefill time per token, µs (default 100)")
    parser.add_argument("--h2d-gbps", type=float, default=25.0, help="host<->device bandwidth, GB/s (default 25)")
    parser.add_argument("--source-gbps", type=float, default=2.0, help="adapter source bandwidth, GB/s (default 2)")
    parser.add_argument("--kv-per-token", type=size_argument, default="128KiB",
                        help="KV bytes per token (default 128KiB: 32 layers, 8 KV heads of 128, fp16)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--scale", type=int, default=256,
                        help="the real cache runs with every size divided by this (default 256)")
    parser.add_argument("--window", type=float, default=30.0, help="cost model window, trace seconds (default 30)")
    parser.add_argument("--swap-interval", type=float, default=0.5, help="swapper period, trace seconds (default 0.5)")
    parser.add_argument("--bandwidth-size", type=size_argument, default="256MiB", help="GPU part: bytes per copy")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--sweep", action="store_true",
                        help="the TTFT ratio at the given settings and at each variation of SWEEP (vLLM-style at "
                             "--vllm-adapter-share, the bound, the tree; no hindsight or S-LoRA rows)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.adapters < 1 or args.scale < 1:
        parser.error("--requests, --adapters and --scale must be positive")

    if args.sweep:
        rows = []
        for label, change in SWEEP:
            varied = argparse.Namespace(**{**vars(args), **change})
            rows.append((label, compare(varied, _workload(varied), full=False)))
        if args.json:
            print(json.dumps({label: results for label, results in rows}, indent=2))
        else:
            _print_sweep(rows)
        return 0
    workload = _workload(args)
    results = compare(args, workload, full=True)
    bandwidth = measure_h2d(args.bandwidth_size, rounds=10)
    if args.json:
        print(json.dumps({"figures": _figures(args), "requests": args.requests, "results": results, "h2d": bandwidth},
                         indent=2))
        return 0
    _print(args, workload, results, bandwidth)
    return 0


def _workload(args: argparse.Namespace) -> Workload:
    trace = [float(line) for line in args.trace.read_text().split()] if args.trace else None
    return generate(requests=args.requests, adapters=args.adapters, seed=args.seed, zipf=args.zipf,
                    rate=args.rate, block_tokens=args.block_tokens, trace=trace)


def _figures(args: argparse.Namespace) -> dict:
    return {"hbm_bytes": args.hbm, "host_bytes": args.host, "prefill_token_s": args.prefill_us * 1e-6,
            "h2d_bw": args.h2d_gbps * 1e9, "source_bw": args.source_gbps * 1e9, "kv_bytes_per_token": args.kv_per_token}


def compare(args: argparse.Namespace, workload: Workload, full: bool) -> list[dict]:
    """Summaries of vLLM-style, [its best share in hindsight, S-LoRA-style,] the bound and the tree, in that
    order, each with ``ttft_vs_vllm``; ``full`` adds the bracketed rows."""
    figures = _figures(args)
    block_bytes = args.kv_per_token * args.block_tokens

    def vllm(share: float) -> dict:
        return run_baseline(VllmStyle(args.hbm, args.host, share, block_bytes, args.block_tokens), workload, figures)

    results = [vllm(args.vllm_adapter_share)]
    if full:
        hindsight = []
        for share in HINDSIGHT_SHARES:
            try:
                hindsight.append((share, vllm(share) if share != args.vllm_adapter_share else dict(results[0])))
            except ValueError:  # the largest adapter does not fit this share
                continue
        share, best = min(hindsight, key=lambda item: item[1]["ttft_ms"])
        best["policy"] = f"  same, best share in hindsight ({share:.0%})"
        results += [best, run_baseline(SloraStyle(args.hbm, args.host, block_bytes), workload, figures)]
    results += [run_baseline(Unbounded(args.block_tokens), workload, figures),
                run_tree(workload, figures, args.scale, args.window, args.swap_interval)]
    for row in results:
        row["ttft_vs_vllm"] = row["ttft_ms"] / results[0]["ttft_ms"]
    return results


def _print_sweep(rows: list[tuple[str, list[dict]]]) -> None:
    print(f"{'setting':<26}{'vLLM ms':>9}{'tree ms':>9}{'tree/vLLM':>10}{'bound/vLLM':>11}"
          f"{'KV hit vLLM':>12}{'tree':>7}{'bound':>7}")
    for label, (vllm, bound, tree) in rows:
        print(f"{label:<26}{vllm['ttft_ms']:>9.1f}{tree['ttft_ms']:>9.1f}{tree['ttft_vs_vllm']:>10.2f}"
              f"{bound['ttft_vs_vllm']:>11.2f}{vllm['kv_hit_rate']:>12.1%}{tree['kv_hit_rate']:>7.1%}"
              f"{bound['kv_hit_rate']:>7.1%}")
    print(f"target: tree/vLLM <= {TTFT_TARGET}; bound: every adapter and prefix ever seen kept in HBM "
          "(no policy does better)")


def _print(args, workload: Workload, results: list[dict], bandwidth: dict | None) -> None:
    duration = workload.requests[-1].ts - workload.requests[0].ts
    tokens = statistics.fmean(r.prompt_len for r in workload.requests)
    arrivals = f"arrivals from {args.trace}" if args.trace else "bursty arrivals"
    print(f"{len(workload.requests)} requests over {duration:.0f} s ({arrivals}), {args.adapters} adapters "
          f"(Zipf {args.zipf}, {format_size(min(workload.adapter_bytes.values()))}-"
          f"{format_size(max(workload.adapter_bytes.values()))}), mean prompt {tokens:.0f} tokens")
    print(f"HBM {format_size(args.hbm)}, host {format_size(args.host)}; stated figures: prefill {args.prefill_us:g} µs/token, "
          f"host<->device {args.h2d_gbps:g} GB/s, source {args.source_gbps:g} GB/s, "
          f"KV {format_size(args.kv_per_token)}/token in blocks of {args.block_tokens}")
    print(f"{'policy':<42}{'KV hit':>7}{'KV w/o adapter':>15}{'source ms':>10}{'copy ms':>9}{'prefill ms':>11}"
          f"{'TTFT ms':>9}{'p99 ms':>8}{'vs vLLM':>8}")
    for r in results:
        print(f"{r['policy']:<42}{r['kv_hit_rate']:>7.1%}{r['kv_without_adapter']:>15.2%}{r['source_ms']:>10.2f}"
              f"{r['copy_ms']:>9.2f}{r['prefill_ms']:>11.1f}{r['ttft_ms']:>9.1f}{r['p99_ttft_ms']:>8.0f}"
              f"{r['ttft_vs_vllm']:>8.2f}")
    tree = results[-1]
    verdict = "met" if tree["ttft_vs_vllm"] <= TTFT_TARGET else "NOT met"
    print(f"target: mean TTFT <= {TTFT_TARGET}x vLLM-style: {verdict} ({tree['ttft_vs_vllm']:.2f}x; "
          f"{tree['ttft_ms'] / results[1]['ttft_ms']:.2f}x its best fixed share in hindsight; "
          f"no policy can beat the bound's {results[-2]['ttft_vs_vllm']:.2f}x)")
    print(f"dependency tree: all its host<->device traffic kept the link {tree['link_busy']:.1%} busy "
          f"(prefetched {format_size(int(tree['prefetch_bytes']))}); {tree['kv_blocks_dropped']} KV blocks dropped")
    if bandwidth is None:
        print("host->device bandwidth: skipped (no CUDA device here)")
        return
    verdict = "met" if bandwidth["pool_vs_bare"] >= BANDWIDTH_TARGET else "NOT met"
    print(f"host->device bandwidth, {format_size(bandwidth['size'])} copies: pool {bandwidth['pool_gbps']:.1f} GB/s, "
          f"bare pinned copy_ {bandwidth['bare_pinned_gbps']:.1f} GB/s, pageable .to() {bandwidth['pageable_gbps']:.1f} GB/s; "
          f"pool >= {BANDWIDTH_TARGET:.0%} of bare pinned: {verdict} ({bandwidth['pool_vs_bare']:.0%})")


if __name__ == "__main__":
    raise SystemExit(main())
