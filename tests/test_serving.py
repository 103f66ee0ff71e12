"""The multi-LoRA serving loop on a real (tiny) Llama with real PEFT adapters.

Every first token is checked against the oracle: a full prefill, without any
cache, by a copy of the model with the adapter loaded by PEFT itself.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from igtcache.bench.serve_contenders import CountingSource, FlatPools, NoCache  # noqa: E402
from igtcache.bench.serve_model import ModelSpec, PeftReference, write_adapters  # noqa: E402
from igtcache.bench.serve_workloads import WORKLOADS, generate, scaled  # noqa: E402
from igtcache.clients.adapter_source import DirectorySource  # noqa: E402
from igtcache.clients.kv_blocks import from_blocks, to_blocks  # noqa: E402
from igtcache.clients.lora_apply import LoraLayers, UnsupportedAdapter  # noqa: E402
from igtcache.clients.lora_kv import LoraKVCache  # noqa: E402
from igtcache.clients.lora_serving import (  # noqa: E402
    LoraServer, Replay, Request, Timeline, WallClock, model_fingerprint,
)
from igtcache.clients.prefix_attention import prefix_causal_attention  # noqa: E402

SPEC = ModelSpec(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_positions=1024)
BLOCK = 8
KV_BLOCK_BYTES = 2 * 2 * 2 * BLOCK * 16 * 4  # layers, K and V, kv heads, tokens, head dim, float32


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return SPEC.build()


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return root, write_adapters(model, root, 4, seed=1)


def conversations(names: list[str], turns: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Interleaved multi-turn conversations, one per adapter: each prompt extends the previous one."""
    rng = np.random.default_rng(seed)
    context = {name: rng.integers(0, SPEC.vocab, 20) for name in names}
    out = []
    for _ in range(turns):
        for name in names:
            context[name] = np.concatenate([context[name], rng.integers(0, SPEC.vocab, int(rng.integers(5, 40)))])
            out.append((name, context[name]))
    return out


def assert_same_tokens(results, expected) -> None:
    for result, reference in zip(results, expected, strict=True):
        assert torch.allclose(result.logits, reference, rtol=0, atol=1e-5), float((result.logits - reference).abs().max())
        assert result.token == int(reference.argmax())


def test_restored_kv_gives_the_logits_of_a_full_prefill_for_every_request(model, adapters):
    root, ranks = adapters
    requests = conversations(list(ranks), turns=4)
    expected = PeftReference(model, root).logits(requests)
    clock = Timeline()
    # HBM for about two adapters and a few blocks: KV goes to the host pool and comes back.
    with LoraKVCache(str(root), device="cpu", hbm_bytes=400 << 10, host_bytes=8 << 20, block_tokens=BLOCK,
                     host_block_bytes=KV_BLOCK_BYTES, clock=clock, model_id=model_fingerprint(model)) as cache:
        server = LoraServer(model, cache, clock)
        results = [server.serve(name, prompt) for name, prompt in requests]
        assert_same_tokens(results, expected)
        later = results[len(ranks):]
        assert all(r.matched_tokens > 0 for r in later)
        assert sum(r.matched_tokens for r in later) > 0.5 * sum(r.prompt_tokens for r in later)
        stats = cache.stats()
        assert stats["kv_hit_tokens_from_host"] > 0 and stats["device_evictions"] > 0
        assert cache.tree.violations() == [] and all(n.refs == 0 for n in cache.tree.nodes())


@pytest.fixture(scope="module")
def three_turns(model, adapters):
    root, ranks = adapters
    requests = conversations(list(ranks), turns=3, seed=2)
    return requests, PeftReference(model, root).logits(requests)


@pytest.mark.parametrize("kind", ["vllm-style", "slora-style", "no-tree", "no-cache"])
def test_the_flat_contenders_serve_the_same_tokens(model, adapters, three_turns, kind):
    root, _ranks = adapters
    requests, expected = three_turns
    source = CountingSource(DirectorySource(root))
    common = dict(device="cpu", block_tokens=BLOCK, model_id=model_fingerprint(model))
    clock = Timeline()
    if kind == "no-cache":
        store = NoCache(source, **common)
    else:
        # HBM short of the adapters (640 KB) and their KV (unified LRU gets room for them: round-robin
        # conversations would otherwise evict every block before its next turn); for no-tree a host pool small
        # enough that moving a victim there evicts host copies, some on a match's path
        store = FlatPools(source, **common, hbm_bytes=(1024 if kind == "slora-style" else 600) << 10,
                          host_bytes=(600 << 10) if kind == "no-tree" else 8 << 20, clock=clock,
                          adapter_share=0.5 if kind == "vllm-style" else None, kv_on_host=kind == "no-tree",
                          ranking="cost" if kind == "no-tree" else "lru")
    server = LoraServer(model, store, clock)
    results = [server.serve(name, prompt) for name, prompt in requests]
    assert_same_tokens(results, expected)
    if kind == "no-cache":
        assert source.files == 2 * len(requests) and all(r.matched_tokens == 0 for r in results)
    else:
        assert sum(r.matched_tokens for r in results) > 0
        assert kind == "no-tree" or source.files < 2 * len(requests)
        assert all(used <= store.capacity[pool] for pool, used in store.used.items())
        assert all(n.refs == 0 for n in [*store.adapters.values(), *store.kv.values()])


def test_kv_is_never_matched_for_another_adapter_or_another_base_model(model, adapters):
    root, ranks = adapters
    first, second = list(ranks)[:2]
    prompt = np.arange(41) % SPEC.vocab
    with LoraKVCache(str(root), device="cpu", block_tokens=BLOCK, model_id=model_fingerprint(model)) as cache:
        server = LoraServer(model, cache)
        assert server.serve(first, prompt).matched_tokens == 0
        assert server.serve(first, prompt).matched_tokens == 40
        assert server.serve(second, prompt).matched_tokens == 0
        other = ModelSpec(**{**SPEC.__dict__, "seed": 1}).build()
        assert model_fingerprint(other) != model_fingerprint(model)
        with pytest.raises(ValueError, match="KV of model"):
            LoraServer(other, cache)
    # The model's identity seeds every block's key: the same adapter and tokens make other keys.
    blocks = to_blocks(_prefill(model, prompt), 0, 40, BLOCK)
    keys = []
    for model_id in (model_fingerprint(model), model_fingerprint(other)):
        with LoraKVCache(str(root), device="cpu", block_tokens=BLOCK, model_id=model_id) as cache:
            cache.release(cache.acquire_adapter(first))
            cache.insert_kv(first, prompt, blocks)
            keys.append(set(cache.tree.adapters[first].children))
    assert len(keys[0]) == len(keys[1]) == 1 and not keys[0] & keys[1]


def _prefill(model, prompt: np.ndarray):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.as_tensor(prompt)[None], cache=cache, use_cache=True)
    return cache


def test_lora_layers_apply_what_peft_applies_and_refuse_what_they_cannot(model, adapters):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    root, ranks = adapters
    name = list(ranks)[2]
    ids = torch.arange(30)[None] % SPEC.vocab
    peft_model = PeftModel.from_pretrained(SPEC.build(), str(root / name)).eval()
    config = json.loads((root / name / "adapter_config.json").read_text())
    base = SPEC.build()
    layers = LoraLayers(base)
    layers.activate(name, load_file(str(root / name / "adapter_model.safetensors")), config)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, peft_model(input_ids=ids).logits)
        layers.deactivate()
        assert torch.equal(base(input_ids=ids).logits, SPEC.build()(input_ids=ids).logits)
    dora = get_peft_model(SPEC.build(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(root.parent / "dora"))
    tensors = load_file(str(root.parent / "dora" / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        layers.activate("dora", tensors, json.loads((root.parent / "dora" / "adapter_config.json").read_text()))
    with pytest.raises(UnsupportedAdapter, match="not a linear layer"):
        layers.activate("x", {"base_model.model.model.nope.lora_A.weight": torch.zeros(2, 64),
                              "base_model.model.model.nope.lora_B.weight": torch.zeros(64, 2)}, {})


@pytest.mark.parametrize("cached, new", [(0, 40), (4, 60), (60, 4), (30, 30)])
def test_prefix_attention_equals_sdpa_with_the_shifted_causal_mask(cached, new):
    torch.manual_seed(0)
    query = torch.randn(1, 4, new, 16)
    key, value = torch.randn(1, 2, cached + new, 16), torch.randn(1, 2, cached + new, 16)
    out, _ = prefix_causal_attention(torch.nn.Module(), query, key, value, None, scaling=0.25)
    mask = torch.ones(new, cached + new, dtype=torch.bool).tril(cached)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask, scale=0.25)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


def test_kv_blocks_round_trip_through_a_dynamic_cache(model):
    prompt = np.arange(35) % SPEC.vocab
    cache = _prefill(model, prompt)
    blocks = to_blocks(cache, 8, 32, BLOCK)
    assert [b.shape for b in blocks] == [(2, 2, 2, BLOCK, 16)] * 3 and all(b.is_contiguous() for b in blocks)
    assert len({b.untyped_storage().data_ptr() for b in blocks}) == 3
    restored = from_blocks(to_blocks(cache, 0, 32, BLOCK))
    for original, back in zip(cache.layers, restored.layers):
        assert torch.equal(original.keys[:, :, :32], back.keys) and torch.equal(original.values[:, :, :32], back.values)
    with pytest.raises(ValueError, match="whole blocks"):
        to_blocks(cache, 3, 16, BLOCK)


class _SleepyServer:
    """Takes ``service`` seconds of wall time per request."""

    def __init__(self, clock, service: float) -> None:
        self.clock, self.service = clock, service

    def serve(self, adapter, prompt):
        from igtcache.clients.lora_serving import FirstToken

        started = self.clock()
        time.sleep(self.service)
        now = self.clock()
        return FirstToken(0, torch.zeros(1), len(prompt), 0, started, started, started, now, now)


def test_the_timeline_skips_idle_time_counts_queueing_and_stops_while_paused():
    clock = Timeline()
    replay = Replay(_SleepyServer(clock, 0.02))
    requests = [Request(t, "a", i, 0, np.zeros(1, dtype=np.int64)) for i, t in enumerate([0.0, 0.005, 100.0])]
    clock.start()
    started = time.perf_counter()
    served = [replay.step(r) for r in requests]
    assert time.perf_counter() - started < 1.0  # the 100 s gap was skipped
    assert 0.02 <= served[0].ttft < 0.05 and served[1].queued >= 0.01 and served[1].ttft >= 0.035
    assert served[2].queued < 0.005 and served[2].result.started >= 100.0
    clock.pause()
    paused_at = clock()
    time.sleep(0.02)
    assert clock() == paused_at
    clock.resume()
    assert clock() - paused_at < 0.01


def test_the_wall_clock_sleeps_until_each_arrival():
    clock = WallClock()
    requests = [Request(t, "a", i, 0, np.zeros(1, dtype=np.int64)) for i, t in enumerate([0.0, 0.001, 0.1])]
    served = Replay(_SleepyServer(clock, 0.02)).run(requests)
    assert served[1].queued >= 0.015 and served[2].result.started >= 0.1 and served[2].queued < 0.01


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_workloads_reuse_what_their_kind_reuses(kind):
    names = [f"a{i}" for i in range(20)]
    requests = generate(kind, requests=300, adapters=names, zipf=1.0, vocab=SPEC.vocab, seed=3)
    arrivals = [r.arrival for r in requests]
    assert arrivals == sorted(arrivals) and 0.8 < arrivals[-1] / len(requests) < 1.2  # Poisson, mean gap 1
    counts = np.bincount([names.index(r.adapter) for r in requests], minlength=20)
    assert counts.max() > 4 * np.median(counts)  # Zipf: a few adapters take most requests
    by_session: dict[int, list[Request]] = {}
    for r in requests:
        by_session.setdefault(r.conversation, []).append(r)
    continued = [s for s in by_session.values() if len(s) > 1]
    if kind == "translation":
        assert not continued
    else:
        assert len(continued) > 10
        for session in continued:
            for before, after in zip(session, session[1:]):
                assert after.turn == before.turn + 1 and after.arrival - before.arrival >= WORKLOADS[kind].think
                assert np.array_equal(after.prompt[:len(before.prompt)], before.prompt)
    if kind == "agent":
        assert min(len(r.prompt) for r in requests) >= WORKLOADS["agent"].system[0]
    assert [r.arrival * 2 for r in requests] == [r.arrival for r in scaled(requests, 0.5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_serving_on_cuda_gives_the_same_tokens_with_kv_swapped_through_the_pinned_pool(adapters):
    root, ranks = adapters
    model = SPEC.build("cuda")
    requests = conversations(list(ranks), turns=4, seed=5)
    expected = PeftReference(model, root).logits(requests)
    clock = Timeline()
    with LoraKVCache(str(root), device="cuda", hbm_bytes=400 << 10, host_bytes=8 << 20, block_tokens=BLOCK,
                     host_block_bytes=KV_BLOCK_BYTES, clock=clock, model_id=model_fingerprint(model)) as cache:
        assert cache.pool.pinned
        results = [LoraServer(model, cache, clock).serve(name, prompt) for name, prompt in requests]
        assert_same_tokens(results, expected)
        assert cache.stats()["kv_hit_tokens_from_host"] > 0


def test_the_serving_benchmark_serves_every_contender_through_s3_and_the_daemon():
    from igtcache.bench.serve import verdicts
    from igtcache.bench.serve_run import CONTENDERS, Options, run

    results = run(Options(requests=16, adapters=4, hbm_bytes=1536 << 10, host_bytes=2 << 20, block_tokens=BLOCK,
                          spec=SPEC, seed=1))
    assert results["logit_mismatches"] == 0
    assert list(results["contenders"]) == list(CONTENDERS)
    for name, figures in results["contenders"].items():
        assert {"ttft_p50_s", "ttft_p99_s", "adapter_hit_ratio", "kv_hit_ratio", "source_bytes"} <= set(figures)
        assert 0 < figures["ttft_p50_s"] <= figures["ttft_p99_s"] and figures["s3_bytes"] > 0
    contenders = results["contenders"]
    assert contenders["no-cache"]["adapter_hit_ratio"] == 0 == contenders["no-cache"]["kv_hit_ratio"]
    assert contenders["igtcache"]["kv_hit_ratio"] > 0 and contenders["igtcache"]["adapter_hit_ratio"] > 0
    assert contenders["no-cache"]["s3_bytes"] > contenders["igtcache"]["s3_bytes"]
    assert set(verdicts(results)) == {"ttft_p50_s_vs_vllm", "ttft_p99_s_vs_vllm", "igtcache-no-tree_ttft_mean_vs_igtcache",
                                      "igtcache-lru_ttft_mean_vs_igtcache"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_the_gpu_benchmark_says_there_is_no_cuda_and_fails(capsys):
    from igtcache.bench import gpu

    assert gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
