"""Serving workloads shaped like those of the FASTLIBRA/ELORA evaluation, as token-id requests.

- ``chat``: multi-turn conversations. Turn 1 is the adapter's short system
  prompt and a user message; each later turn's prompt is the conversation so
  far (previous prompt, the answer, a new message), so it reuses the KV of
  the previous turn's prompt.
- ``translation``: a short system prompt per adapter and a text of its own
  per request: nothing is reused beyond the system prompt.
- ``agent``: sessions of steps on a long tool prompt per adapter; each step
  appends the model's action and the tool's observation.

Arrivals are Poisson; times are in units of the mean inter-arrival time
(``scaled`` turns them into seconds at a rate). A session's next step is
ready ``think`` units after its previous one arrived; each arrival continues
a ready session with probability ``continue_p`` (or starts a new one, whose
adapter is drawn by Zipf popularity with exponent ``zipf``). Token ids are
uniform over the vocabulary: the model is random, so content does not matter,
only which tokens repeat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from igtcache.clients.lora_serving import Request


@dataclass(frozen=True)
class Shape:
    """Lengths (token ranges, ``[low, high)``) and session dynamics of a workload."""

    system: tuple[int, int]        # shared prompt per adapter
    first: tuple[int, int]         # the session's first message
    answer: tuple[int, int]        # what the model said before the next step (0, 1 for none)
    message: tuple[int, int]       # each later message or observation
    steps: float                   # mean steps per session (geometric)
    think: float                   # units between a step's arrival and the next step being ready
    continue_p: float
    max_context: int


WORKLOADS = {
    "chat": Shape(system=(24, 64), first=(40, 200), answer=(60, 250), message=(20, 150), steps=5.0, think=20.0,
                  continue_p=0.8, max_context=2048),
    "translation": Shape(system=(16, 48), first=(100, 400), answer=(0, 1), message=(0, 1), steps=1.0, think=0.0,
                         continue_p=0.0, max_context=2048),
    "agent": Shape(system=(512, 1024), first=(40, 150), answer=(20, 80), message=(50, 200), steps=4.0, think=5.0,
                   continue_p=0.7, max_context=2048),
}


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def generate(kind: str, *, requests: int, adapters: list[str], zipf: float, vocab: int, seed: int = 0) -> list[Request]:
    """``requests`` requests of workload ``kind`` over ``adapters`` (arrivals in mean inter-arrival units)."""
    shape = WORKLOADS[kind]
    rng = np.random.default_rng(seed)
    popularity = zipf_weights(len(adapters), zipf)
    ranked = [adapters[i] for i in rng.permutation(len(adapters))]  # popularity independent of the name
    system = {name: _tokens(rng, shape.system, vocab) for name in adapters}
    arrivals = np.cumsum(rng.exponential(1.0, requests))
    open_sessions: dict[int, tuple[str, np.ndarray, int, float, int]] = {}  # id -> adapter, prompt, turn, ready, left
    out: list[Request] = []
    for t in arrivals:
        ready = [sid for sid, session in open_sessions.items() if session[3] <= t]
        if ready and rng.random() < shape.continue_p:
            sid = ready[int(rng.integers(len(ready)))]
            adapter, previous, turn, _ready, left = open_sessions.pop(sid)
            prompt = np.concatenate([previous, _tokens(rng, shape.answer, vocab), _tokens(rng, shape.message, vocab)])
            turn += 1
        else:
            sid = len(out)
            adapter = ranked[int(rng.choice(len(adapters), p=popularity))]
            prompt = np.concatenate([system[adapter], _tokens(rng, shape.first, vocab)])
            turn, left = 0, int(rng.geometric(1.0 / shape.steps))
        out.append(Request(float(t), adapter, sid, turn, prompt))
        if left > 1 and len(prompt) + shape.answer[1] + shape.message[1] <= shape.max_context:
            open_sessions[sid] = (adapter, prompt, turn, t + shape.think, left - 1)
    return out


def scaled(requests: list[Request], rate: float) -> list[Request]:
    """The same requests arriving at ``rate`` per second on average."""
    return [dataclasses.replace(r, arrival=r.arrival / rate) for r in requests]


def _tokens(rng: np.random.Generator, span: tuple[int, int], vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, int(rng.integers(*span)), dtype=np.int64)
