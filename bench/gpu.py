"""What needs a GPU, in one command (under 10 minutes on one CUDA device): copies, CUDA tests, serving.

1. Pinned pool bandwidth: host->device and device->host copies through
   ``igtcache.cuda.PinnedBlockPool`` (one pinned buffer cut into blocks, its
   own copy stream) next to a bare ``copy_`` from/to a pinned tensor of the
   same size, in the same run, the two taking turns. Target: the pool >= 90%
   of the bare pinned copy in both directions.
2. The CUDA tests: ``pytest -k cuda`` over the pool's and the serving loop's
   tests (from the source tree; skipped when the tests are not there).
3. The serving benchmark (``igtcache bench serve``) on the GPU: a wider
   Llama than the CPU run's, budgets scaled by its KV bytes per token, chat.

Without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
TARGET = 0.9
TESTS = ("tests/test_pinned_pool.py", "tests/test_serving.py")


def bandwidth(size: int, rounds: int) -> dict:
    """GB/s of each direction through the pool and bare, medians of ``rounds`` alternating rounds."""
    from igtcache.cuda import PinnedBlockPool

    device = torch.device("cuda")
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    on_device = data.to(device)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(data)
    rates: dict[str, list[float]] = {k: [] for k in ("pool_h2d", "bare_h2d", "pool_d2h", "bare_d2h")}
    with PinnedBlockPool(size, device=device, block_bytes=2 * MiB) as pool:
        buffer = pool.alloc(size)
        pool.write(buffer, data.numpy())
        copies = {
            "pool_h2d": lambda: pool.to_device(buffer, out=target)[1].synchronize(),
            "bare_h2d": lambda: (target.copy_(pinned, non_blocking=True), torch.cuda.synchronize()),
            "pool_d2h": lambda: pool.to_host(on_device, buffer).synchronize(),
            "bare_d2h": lambda: (pinned.copy_(on_device, non_blocking=True), torch.cuda.synchronize()),
        }
        for copy in copies.values():
            copy()  # warm up
        for _ in range(rounds):
            for name, copy in copies.items():
                torch.cuda.synchronize()
                started = time.perf_counter()
                copy()
                rates[name].append(size / (time.perf_counter() - started) / 1e9)
        if pool.read(buffer, 0, 4096) != data[:4096].numpy().tobytes():
            raise RuntimeError("the pool's buffer does not hold the bytes copied into it")
    out = {name: statistics.median(values) for name, values in rates.items()}
    out.update(size=size, h2d_vs_bare=out["pool_h2d"] / out["bare_h2d"], d2h_vs_bare=out["pool_d2h"] / out["bare_d2h"])
    return out


def cuda_tests(root: Path) -> dict:
    """Run the CUDA tests of the source tree; their counts and exit status."""
    paths = [str(root / t) for t in TESTS if (root / t).exists()]
    if not paths:
        return {"skipped": f"no tests under {root}"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *paths],
                          cwd=root, capture_output=True, text=True, timeout=300)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": done.returncode, "summary": summary, "seconds": time.perf_counter() - started}


def serving(requests: int, hidden: int, layers: int) -> dict:
    """The serving benchmark on CUDA, budgets scaled from the CPU defaults by KV bytes per token."""
    from igtcache.bench.serve import verdicts
    from igtcache.bench.serve_model import ModelSpec
    from igtcache.bench.serve_run import Options, run

    cpu, gpu = ModelSpec(), ModelSpec(hidden=hidden, layers=layers, intermediate=hidden * 43 // 16)
    factor = (gpu.layers * gpu.hidden) // (cpu.layers * cpu.hidden)  # KV per token: layers x kv heads x head dim
    defaults = Options()
    results = run(Options(requests=requests, device="cuda", spec=gpu, hbm_bytes=defaults.hbm_bytes * factor,
                          host_bytes=defaults.host_bytes * factor))
    results["targets"] = verdicts(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igtcache bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_argument, action="append",
                        help="bytes per copy, repeatable (default 16MiB and 256MiB)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per bandwidth figure (default 10)")
    parser.add_argument("--requests", type=int, default=400, help="serving benchmark requests (default 400)")
    parser.add_argument("--hidden", type=int, default=1024, help="serving model hidden size (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="serving model layers (default 8)")
    parser.add_argument("--skip", action="append", default=[], choices=["bandwidth", "tests", "serving"],
                        help="leave a part out, repeatable")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("igtcache bench gpu: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "bandwidth" not in args.skip:
        results["bandwidth"] = [bandwidth(size, args.rounds) for size in args.size or [16 * MiB, 256 * MiB]]
    if "tests" not in args.skip:
        results["tests"] = cuda_tests(Path.cwd())
    if "serving" not in args.skip:
        results["serving"] = serving(args.requests, args.hidden, args.layers)
    met = all(r["h2d_vs_bare"] >= TARGET and r["d2h_vs_bare"] >= TARGET for r in results.get("bandwidth", []))
    passed = results.get("tests", {}).get("returncode", 0) == 0
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0 if met and passed else 1


def _print(results: dict) -> None:
    from igtcache.bench.serve import report

    print(f"device: {results['device']}, torch {results['torch']}")
    for r in results.get("bandwidth", []):
        for direction in ("h2d", "d2h"):
            ratio = r[f"{direction}_vs_bare"]
            print(f"{format_size(r['size'])} {direction}: pool {r[f'pool_{direction}']:.1f} GB/s, bare pinned copy_ "
                  f"{r[f'bare_{direction}']:.1f} GB/s: {ratio:.0%} (target >= {TARGET:.0%}: "
                  f"{'met' if ratio >= TARGET else 'NOT met'})")
    if "tests" in results:
        tests = results["tests"]
        print(f"CUDA tests: {tests.get('summary') or tests.get('skipped')}")
    if "serving" in results:
        report(results["serving"])
