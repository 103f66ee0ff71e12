"""Multi-LoRA serving on a real (tiny) Llama: time to first token of igtcache's LoraKVCache and its rivals.

A seeded random Llama (transformers, float32; nothing downloaded) serves one
workload (``--workload``: chat, translation or agent; Zipf-popular
adapters, Poisson arrivals loading the model to ``--load`` of what full
prefills would need) with adapters made by PEFT and stored on a local S3
server. Each contender serves every request through the same serving loop
(``igtcache.clients.lora_serving``): adapter from its cache, the longest
cached prefix's KV restored as past key/values, the rest of the prompt
prefilled, the first token taken, the new KV blocks cached. TTFT is from
arrival to first token, queueing included.

Contenders (same HBM and host budgets, ``--hbm`` and ``--host``):

  no-cache          adapter read from S3 on every request, full prefill
  vllm-style        LRU adapters in a fixed share of HBM (--vllm-adapter-share),
                    LRU prefix KV in the rest, KV in HBM only; LRU host adapter cache
  slora-style       one unified HBM pool of adapters and prefix KV, LRU, KV in HBM only
  igtcache          LoraKVCache: dependency tree + cost model over HBM and host pools
  igtcache-lru      ablation: the tree, LRU in place of the cost model
  igtcache-no-tree  ablation: the cost model, no dependency tree

Every first token's logits are compared with a full prefill without any
cache by the model with the adapter loaded by PEFT (float32, within 1e-5 of
the largest logit, and the same greedy token): ``logit_mismatches``.

Contenders take turns request by request, each on its own timeline (real
time while serving; the idle time until the next arrival skipped; paused
while the others run), so that noise on a shared machine hits all of them
alike; ``--real-time`` runs them one after another in wall time, sleeping
until each arrival. Targets on chat at the defaults: igtcache TTFT p50 <=
0.6x and p99 <= 0.5x vllm-style's, 0 logit mismatches.

--json prints {"logit_mismatches": N, "contenders": {NAME: {"ttft_p50_s",
"ttft_p99_s", "adapter_hit_ratio", "kv_hit_ratio", "source_bytes", "s3_bytes",
...}}, "workload": {...}, ...}. source_bytes: what the contender read from
its adapter source (S3 itself for no-cache, the node daemon over S3 for the
others); s3_bytes: what of it reached S3.
"""

from __future__ import annotations

import argparse
import json

import torch

from igtcache.bench.serve_model import ModelSpec
from igtcache.bench.serve_run import CONTENDERS, Options, run
from igtcache.bench.serve_workloads import WORKLOADS
from igtcache.sizes import format_size, size_argument

TARGETS = {"ttft_p50_s": 0.6, "ttft_p99_s": 0.5}
# ELORA/FASTLIBRA's ablations: TTFT of each variant over the full system's.
PAPER_ABLATIONS = {"igtcache-no-tree": 1.51, "igtcache-lru": 1.42}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igtcache bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="chat", help="default chat")
    parser.add_argument("--requests", type=int, default=400, help="requests served by each contender (default 400)")
    parser.add_argument("--adapters", type=int, default=100, help="distinct adapters, 50-200 (default 100)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (default 1.0)")
    parser.add_argument("--load", type=float, default=0.7,
                        help="arrival rate as a share of the model's capacity for full prefills (default 0.7)")
    parser.add_argument("--hbm", type=size_argument, default="32MiB",
                        help="HBM budget for adapters and KV, per contender (default 32MiB: about a tenth of the "
                             "chat run's distinct prefix KV)")
    parser.add_argument("--host", type=size_argument, default="128MiB",
                        help="host memory budget, per contender (default 128MiB, 4x HBM)")
    parser.add_argument("--vllm-adapter-share", type=float, default=0.2,
                        help="vllm-style: share of HBM fixed for adapters (default 0.2, as in the paper's setup)")
    parser.add_argument("--block-tokens", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--window-requests", type=float, default=25.0,
                        help="cost model window, in mean inter-arrival times (default 25; longer windows keep "
                             "the KV of finished conversations)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    parser.add_argument("--real-time", action="store_true",
                        help="contenders one after another in wall time (sleeping until arrivals), not in turns")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--layers", type=int, default=ModelSpec.layers, help=f"model layers (default {ModelSpec.layers})")
    parser.add_argument("--hidden", type=int, default=ModelSpec.hidden, help=f"hidden size (default {ModelSpec.hidden})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    contenders = tuple(name.strip() for name in args.contenders.split(",") if name.strip())
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or not contenders:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.requests < 1 or not 1 <= args.adapters <= 999 or not 0 < args.load or args.hbm <= 0:
        parser.error("--requests, --hbm and --load must be positive, --adapters 1-999")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    spec = ModelSpec(layers=args.layers, hidden=args.hidden, intermediate=args.hidden * 43 // 16, seed=args.seed)
    results = run(Options(
        workload=args.workload, requests=args.requests, adapters=args.adapters, zipf=args.zipf, load=args.load,
        hbm_bytes=args.hbm, host_bytes=args.host, block_tokens=args.block_tokens,
        vllm_adapter_share=args.vllm_adapter_share, window_requests=args.window_requests, contenders=contenders,
        real_time=args.real_time, device=args.device, seed=args.seed, spec=spec,
    ))
    results["targets"] = verdicts(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    return 0


def verdicts(results: dict) -> dict:
    """Each target's ratio and whether it is met, and the ablations next to the paper's."""
    contenders = results["contenders"]
    out: dict = {}
    ours = contenders.get("igtcache")
    if ours is None:
        return out
    if "vllm-style" in contenders:
        for key, target in TARGETS.items():
            ratio = ours[key] / contenders["vllm-style"][key]
            out[f"{key}_vs_vllm"] = {"ratio": ratio, "target": target, "met": ratio <= target}
    for name, paper in PAPER_ABLATIONS.items():
        if name in contenders:
            out[f"{name}_ttft_mean_vs_igtcache"] = {"ratio": contenders[name]["ttft_mean_s"] / ours["ttft_mean_s"],
                                                   "paper": paper}
    return out


def report(results: dict) -> None:
    w, b = results["workload"], results["budgets"]
    print(f"{w['kind']}: {w['requests']} requests over {w['duration_s']:.1f} s ({w['rate_per_s']:.1f}/s, load "
          f"{w['load']:.0%} of full prefills of {w['mean_full_prefill_s'] * 1e3:.1f} ms), {w['adapters']} adapters "
          f"(Zipf {w['zipf']}, {format_size(w['adapter_bytes_uploaded'])} on S3), mean prompt "
          f"{w['mean_prompt_tokens']:.0f} tokens, {format_size(w['distinct_kv_bytes'])} of distinct prefix KV")
    m = results["model"]
    print(f"model: Llama {m['layers']} layers, hidden {m['hidden']}, on {m['device']} ({m['threads']} threads); "
          f"budgets: HBM {format_size(b['hbm_bytes'])}, host {format_size(b['host_bytes'])}; clock: {results['clock']}")
    print(f"{'contender':<18}{'TTFT p50':>10}{'p99':>9}{'mean':>9}{'queued':>9}{'service':>9}{'busy':>6}"
          f"{'adapter hit':>12}{'KV hit':>8}{'source':>10}{'S3':>10}{'mismatch':>9}")
    for name, c in results["contenders"].items():
        print(f"{name:<18}{c['ttft_p50_s'] * 1e3:>8.1f}ms{c['ttft_p99_s'] * 1e3:>7.0f}ms{c['ttft_mean_s'] * 1e3:>7.1f}ms"
              f"{c['queued_mean_s'] * 1e3:>7.1f}ms{c['service_mean_s'] * 1e3:>7.1f}ms{c['busy']:>6.0%}"
              f"{c['adapter_hit_ratio']:>12.1%}"
              f"{c['kv_hit_ratio']:>8.1%}{format_size(c['source_bytes']):>10}{format_size(c['s3_bytes']):>10}"
              f"{c['logit_mismatches']:>9}")
    print(f"logit mismatches against full prefill (PEFT): {results['logit_mismatches']}")
    for key, verdict in results["targets"].items():
        if "target" in verdict:
            state = "met" if verdict["met"] else "NOT met"
            print(f"target {key.replace('_vs_vllm', '')} <= {verdict['target']}x vllm-style: {state} "
                  f"({verdict['ratio']:.2f}x)")
        else:
            print(f"ablation {key}: {verdict['ratio']:.2f}x (paper: {verdict['paper']}x)")
