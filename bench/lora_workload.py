"""A multi-LoRA serving workload: Zipf-popular adapters, shared prompt prefixes, bursty arrivals.

- Arrivals: a two-state Markov-modulated Poisson process (calm at ``rate``
  requests/s, bursts at ``burst_factor`` times that), or the timestamps of a
  trace file (one number of seconds per line).
- Adapters: chosen by Zipf popularity (exponent ``zipf``); during a burst half
  the requests go to a small set of adapters drawn at random from the whole
  population (a tenant's batch job), so popularity shifts.
- Prompts: each adapter has a few system prompts (shared prefixes, themselves
  Zipf-popular); a request either starts a conversation (system prompt + user
  message) or continues one of that adapter's recent conversations (its whole
  previous context, the previous answer and a new message), so later turns
  share the earlier turns' KV.
- Adapter sizes: LoRA rank 8-64 on q, k, v, o of a Llama-3-8B-like model
  (32 layers, hidden 4096, 8 KV heads of 128, fp16): per layer
  ``rank * (4096+4096 + 4096+1024 + 4096+1024 + 4096+4096) * 2`` bytes,
  ``1.625 MiB * rank`` in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from igtcache.clients.kv_tree import chain_hashes

RANKS = (8, 16, 32, 64)
ADAPTER_BYTES_PER_RANK = 32 * 26624 * 2


@dataclass
class Request:
    ts: float
    adapter: str
    tokens: np.ndarray    # the prompt, then the generated tokens
    prompt_len: int       # tokens the prefill sees
    keys: list[bytes]     # chain hashes of the full blocks of ``tokens``


@dataclass
class Workload:
    requests: list[Request]
    adapter_bytes: dict[str, int]   # real (unscaled) size of each adapter
    adapter_ranks: dict[str, int]
    block_tokens: int


def arrivals(n: int, rng: np.random.Generator, rate: float, burst_factor: float,
             calm_s: float, burst_s: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` arrival times of a two-state MMPP and whether each fell in a burst."""
    times, bursty = np.empty(n), np.zeros(n, dtype=bool)
    t, in_burst = 0.0, False
    switch = rng.exponential(calm_s)
    for i in range(n):
        t += rng.exponential(1.0 / (rate * (burst_factor if in_burst else 1.0)))
        while t >= switch:
            in_burst = not in_burst
            switch += rng.exponential(burst_s if in_burst else calm_s)
        times[i], bursty[i] = t, in_burst
    return times, bursty


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def generate(*, requests: int, adapters: int, seed: int, zipf: float = 1.0, rate: float = 10.0,
             burst_factor: float = 4.0, calm_s: float = 40.0, burst_s: float = 10.0, block_tokens: int = 16,
             prompts_per_adapter: int = 4, continue_p: float = 0.5, max_context: int = 4096,
             trace: list[float] | None = None) -> Workload:
    """The request sequence every policy replays."""
    rng = np.random.default_rng(seed)
    names = [f"lora-{i:03d}" for i in range(adapters)]
    ranks = {name: int(rng.choice(RANKS)) for name in names}
    popularity = _zipf_weights(adapters, zipf)
    prompt_popularity = _zipf_weights(prompts_per_adapter, 1.0)
    system = {(name, j): rng.integers(0, 32000, int(rng.integers(256, 1025))) for name in names
              for j in range(prompts_per_adapter)}
    if trace is not None:
        times = np.asarray(sorted(trace)[:requests], dtype=float)
        bursty = np.zeros(len(times), dtype=bool)
    else:
        times, bursty = arrivals(requests, rng, rate, burst_factor, calm_s, burst_s)
    hot_set = rng.choice(adapters, 3, replace=False)
    conversations: dict[str, list[np.ndarray]] = {name: [] for name in names}
    out, was_bursty = [], False
    for ts, burst in zip(times, bursty):
        if burst and not was_bursty:
            hot_set = rng.choice(adapters, 3, replace=False)
        was_bursty = burst
        index = int(rng.choice(hot_set)) if burst and rng.random() < 0.5 else int(rng.choice(adapters, p=popularity))
        name = names[index]
        recent = conversations[name]
        message = rng.integers(0, 32000, int(rng.integers(30, 300)))
        if recent and rng.random() < continue_p:
            context = recent.pop(int(rng.integers(len(recent))))
            prompt = np.concatenate([context, message])
        else:
            prompt = np.concatenate([system[name, int(rng.choice(prompts_per_adapter, p=prompt_popularity))], message])
        full = np.concatenate([prompt, rng.integers(0, 32000, int(rng.integers(50, 300)))])
        if len(full) + 300 < max_context:
            recent.append(full)
            del recent[:-8]
        out.append(Request(float(ts), name, full, len(prompt), chain_hashes(full, block_tokens)))
    return Workload(out, {name: ADAPTER_BYTES_PER_RANK * ranks[name] for name in names}, ranks, block_tokens)
