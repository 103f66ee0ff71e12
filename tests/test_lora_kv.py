"""The LoRA/KV cache client: adapters and prefix KV blocks in one HBM pool and one host pool.

Everything runs on the CPU fallback (``device="cpu"``): "HBM" is a byte budget
for tensors on the cache's device and copies are synchronous, but the tree,
the placement invariants, the cost model and the pools are the code a GPU
runs. Adapters are tiny PEFT directories written with the real
``safetensors`` package; time is a fake clock the tests move.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch

from igtcache import Cache
from igtcache.clients.kv_tree import AdapterNode, DependencyTree
from igtcache.clients.lora_kv import AdapterError, CacheFullError, LoraKVCache
from igtcache.clients.swapper import CostModel, device_victims

from .helpers import in_threads

safetensors_torch = pytest.importorskip("safetensors.torch")

ADAPTER_BYTES = 1536  # packed size of ``write_adapter``'s tensors (256-byte aligned)
KV_SHAPE = (2, 4, 8)  # one block of 4 tokens: 256 bytes of float32


def write_adapter(root: Path, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        tensors[f"base_model.layers.{layer}.q_proj.lora_A.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"base_model.layers.{layer}.q_proj.lora_B.weight"] = torch.randn(32, 4, generator=g).half()
    (root / name).mkdir(parents=True)
    safetensors_torch.save_file(tensors, str(root / name / "adapter_model.safetensors"))
    (root / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "seed": seed}))
    return tensors


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def adapters(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    return root, {f"a{i}": write_adapter(root, f"a{i}", seed=i) for i in range(6)}


def make_cache(root, **kwargs) -> LoraKVCache:
    options = dict(device="cpu", hbm_bytes=16 * ADAPTER_BYTES, host_bytes=64 * ADAPTER_BYTES, block_tokens=4,
                   host_block_bytes=256, clock=Clock(), swap_interval=1e9,
                   bandwidth={"h2d": 1e9, "d2h": 1e9, "source": 1e8})
    options.update(kwargs)
    return LoraKVCache(root, **options)


def kv_blocks(n: int, tag: float) -> list[torch.Tensor]:
    return [torch.full(KV_SHAPE, tag + i) for i in range(n)]


def assert_healthy(cache: LoraKVCache) -> None:
    assert cache.tree.violations() == []
    assert cache.tree.device_bytes <= cache.hbm_bytes
    assert cache.tree.host_bytes <= cache.pool.capacity
    assert cache.tree.kv_bytes_without_adapter() == 0


# ---------------------------------------------------------------------- adapters


def test_acquire_returns_the_adapters_tensors_and_serves_the_next_from_hbm(adapters):
    root, tensors = adapters
    with make_cache(root) as cache:
        adapter = cache.acquire_adapter("a1")
        assert set(adapter) == set(tensors["a1"])
        for name, tensor in tensors["a1"].items():
            assert adapter[name].dtype == tensor.dtype and torch.equal(adapter[name], tensor)
        assert adapter.config == {"peft_type": "LORA", "r": 4, "seed": 1}
        cache.release(adapter)
        again = cache.acquire_adapter("a1")
        assert torch.equal(again["base_model.layers.1.q_proj.lora_B.weight"],
                           tensors["a1"]["base_model.layers.1.q_proj.lora_B.weight"])
        stats = cache.stats()
        assert stats["adapter_loads_source"] == 1 and stats["adapter_hits_device"] == 1
        assert stats["hbm"]["adapters_bytes"] == ADAPTER_BYTES


def test_unknown_adapter_is_a_key_error_naming_it(adapters):
    root, _ = adapters
    with make_cache(root) as cache:
        with pytest.raises(KeyError) as info:
            cache.acquire_adapter("no-such-adapter")
        assert info.value.args == ("no-such-adapter",)
        with pytest.raises(ValueError, match="bad adapter name"):
            cache.acquire_adapter("../a1")
        assert cache.stats()["adapters_known"] == 0


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))


def _huge_header_length(path: Path) -> None:
    path.write_bytes((1 << 62).to_bytes(8, "little") + path.read_bytes()[8:])


def _wrong_tensor_size(path: Path) -> None:
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [5, 32]
    text = json.dumps(header).encode().ljust(header_len)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len:])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "truncated safetensors file"),
    (_garbage_header, "corrupt safetensors header"),
    (_huge_header_length, "not a safetensors file"),
    (_wrong_tensor_size, "bytes for shape"),
    (lambda p: p.unlink(), "has no adapter_model.safetensors"),
    (lambda p: (p.parent / "adapter_config.json").write_text("{nope"), "not valid JSON"),
])
def test_a_damaged_adapter_fails_clearly_and_nothing_is_cached(adapters, damage, message):
    root, _ = adapters
    damage(root / "a2" / "adapter_model.safetensors")
    with make_cache(root) as cache:
        with pytest.raises(AdapterError, match=message):
            cache.acquire_adapter("a2")
        stats = cache.stats()
        assert stats["adapters_known"] == 0 and stats["hbm"]["bytes"] == 0 and stats["host"]["bytes"] == 0
        assert cache.pool.free_bytes == cache.pool.capacity
        cache.release(cache.acquire_adapter("a3"))  # the cache goes on working


@pytest.mark.timeout(20)
def test_an_adapter_larger_than_a_pool_is_refused_at_once(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=ADAPTER_BYTES - 1) as cache:
        with pytest.raises(ValueError, match="more than the whole HBM pool"):
            cache.acquire_adapter("a0")
    with make_cache(root, host_bytes=ADAPTER_BYTES // 2) as cache:
        with pytest.raises(ValueError, match="more than the whole host pool"):
            cache.acquire_adapter("a0")
        assert cache.stats()["adapters_known"] == 0


@pytest.mark.timeout(20)
def test_held_adapters_are_never_evicted_and_a_full_pool_says_so(adapters):
    root, tensors = adapters
    with make_cache(root, hbm_bytes=2 * ADAPTER_BYTES) as cache:
        a0, a1 = cache.acquire_adapter("a0"), cache.acquire_adapter("a1")
        with pytest.raises(CacheFullError, match="held by requests in use"):
            cache.acquire_adapter("a2")
        cache.release(a0)
        a2 = cache.acquire_adapter("a2")
        for name, tensor in tensors["a1"].items():
            assert torch.equal(a1[name], tensor)  # a1 stayed where it was
        assert {n.name for n in cache.tree.on_device} == {"a1", "a2"}
        cache.release(a1)
        cache.release(a2)
        with pytest.raises(ValueError, match="released twice"):
            cache.release(a2)
        assert_healthy(cache)


# ---------------------------------------------------------------------- KV blocks


def test_insert_then_match_returns_the_longest_cached_prefix(adapters):
    root, _ = adapters
    with make_cache(root) as cache:
        adapter = cache.acquire_adapter("a0")
        tokens = list(range(100, 114))  # 3 full blocks of 4 and 2 tokens more
        assert cache.match_prefix("a0", tokens).tokens == 0
        blocks = kv_blocks(4, 0.0)
        assert cache.insert_kv("a0", tokens, blocks) == 3
        match = cache.match_prefix("a0", tokens)
        assert match.tokens == 12 and all(torch.equal(m, b) for m, b in zip(match.blocks, blocks))
        diverging = tokens[:6] + [0] * 8
        assert cache.match_prefix("a0", diverging).tokens == 4
        assert cache.insert_kv("a0", diverging, kv_blocks(3, 50.0)) == 2  # the shared first block is kept
        longer = cache.match_prefix("a0", diverging + [1])
        assert longer.tokens == 12 and longer.blocks[0][0, 0, 0] == 0.0 and longer.blocks[1][0, 0, 0] == 51.0
        stats = cache.stats()
        assert stats["kv_blocks_inserted"] == 5 and stats["kv_hit_tokens"] == 12 + 4 + 12
        for handle in (match, longer, adapter):
            cache.release(handle)
        assert_healthy(cache)


def test_kv_of_different_adapters_is_never_shared(adapters):
    root, _ = adapters
    with make_cache(root) as cache:
        for name in ("a0", "a1"):
            cache.release(cache.acquire_adapter(name))
        tokens = list(range(8))
        cache.insert_kv("a0", tokens, kv_blocks(2, 0.0))
        assert cache.match_prefix("a1", tokens).tokens == 0
        cache.insert_kv("a1", tokens, kv_blocks(2, 10.0))
        assert cache.match_prefix("a1", tokens).blocks[0][0, 0, 0] == 10.0
        assert cache.match_prefix("a0", tokens).blocks[0][0, 0, 0] == 0.0
        assert_healthy(cache)


def test_insert_kv_checks_its_input(adapters):
    root, _ = adapters
    with make_cache(root) as cache:
        with pytest.raises(KeyError):
            cache.insert_kv("a0", list(range(4)), kv_blocks(1, 0.0))  # never acquired
        cache.release(cache.acquire_adapter("a0"))
        with pytest.raises(ValueError, match="10 tokens make 2 full blocks"):
            cache.insert_kv("a0", list(range(10)), kv_blocks(1, 0.0))
        with pytest.raises(ValueError, match="contiguous"):
            cache.insert_kv("a0", list(range(4)), [torch.zeros(8, 4).t()])
        with pytest.raises(ValueError, match="larger than both pools"):
            cache.insert_kv("a0", list(range(4)), [torch.zeros(cache.pool.capacity)])
        assert cache.insert_kv("a0", list(range(10)), kv_blocks(3, 0.0)) == 2  # trailing partial block ignored


def test_evicted_kv_comes_back_from_host_with_its_adapter(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=3 * ADAPTER_BYTES) as cache:
        tokens = list(range(16))
        blocks = kv_blocks(4, 7.0)
        cache.release(cache.acquire_adapter("a0"))
        cache.insert_kv("a0", tokens, blocks)
        cache.clock.now += 1
        held = [cache.acquire_adapter(name) for name in ("a1", "a2", "a3")]  # a0 and its blocks must make room
        for handle in held:
            cache.release(handle)
        a0 = cache.tree.adapters["a0"]
        assert a0.dev is None and a0.host is not None
        assert all(n.dev is None and n.host is not None for n in cache.tree.walk(a0, list(a0.children)[:1]))
        assert_healthy(cache)
        match = cache.match_prefix("a0", tokens)
        assert match.tokens == 16 and all(torch.equal(m, b) for m, b in zip(match.blocks, blocks))
        stats = cache.stats()
        assert stats["kv_hit_tokens_from_host"] == 16 and stats["d2h_demand_bytes"] >= 4 * 256
        assert a0.dev is not None  # the blocks came in after their adapter
        cache.release(match)
        assert_healthy(cache)


def test_when_both_tiers_are_full_cold_kv_is_dropped_and_adapters_fall_back_to_source(adapters):
    root, tensors = adapters
    with make_cache(root, hbm_bytes=2 * ADAPTER_BYTES, host_bytes=2 * ADAPTER_BYTES) as cache:
        for i, name in enumerate(["a0", "a1", "a2", "a3", "a4", "a5"]):
            cache.clock.now += 1
            cache.release(cache.acquire_adapter(name))
            cache.insert_kv(name, list(range(8)), kv_blocks(2, float(i)))
            assert_healthy(cache)
        stats = cache.stats()
        assert stats["kv_blocks_dropped"] > 0 and stats["adapters_to_source"] > 0
        loads = stats["adapter_loads_source"]
        adapter = cache.acquire_adapter("a0")  # long gone from both tiers: read from the source again
        assert cache.stats()["adapter_loads_source"] == loads + 1
        assert all(torch.equal(adapter[k], v) for k, v in tensors["a0"].items())
        cache.release(adapter)
        assert_healthy(cache)


@pytest.mark.timeout(60)
def test_invariants_hold_under_a_random_workload(adapters):
    root, tensors = adapters
    rng = random.Random(7)
    with make_cache(root, hbm_bytes=4 * ADAPTER_BYTES, host_bytes=6 * ADAPTER_BYTES, swap_interval=0.5) as cache:
        prompts = {name: [[rng.randrange(50) for _ in range(rng.choice([4, 8, 12, 16]))] for _ in range(3)]
                   for name in tensors}
        held = []
        for step in range(600):
            cache.clock.now += rng.random() * 0.3
            name = rng.choice(list(tensors))
            try:
                adapter = cache.acquire_adapter(name)
            except CacheFullError:
                assert held, "only held data may block an acquire"
            else:
                tokens = rng.choice(prompts[name]) + [rng.randrange(50) for _ in range(rng.randrange(6))]
                match = cache.match_prefix(name, tokens)
                tag = float(sum(tokens))
                for block in match.blocks:
                    assert all(n.dev is not None for n in match.nodes)
                    assert block.shape == KV_SHAPE
                blocks = match.blocks + kv_blocks(len(tokens) // 4 - len(match.blocks), tag)
                cache.insert_kv(name, tokens, blocks)
                held.append((adapter, match))
            while held and (len(held) > 2 or rng.random() < 0.5):
                for handle in held.pop(rng.randrange(len(held))):
                    cache.release(handle)
            assert_healthy(cache)
            for node in cache.tree.nodes():
                assert node.refs >= 0
        stats = cache.stats()
        assert stats["kv_hit_tokens"] > 0 and stats["device_evictions"] > 0 and stats["kv_hit_tokens_from_host"] > 0


def test_matched_blocks_keep_their_content_through_swaps(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=3 * ADAPTER_BYTES, host_bytes=40 * ADAPTER_BYTES) as cache:
        expected = {}
        for round_ in range(3):
            for i, name in enumerate(["a0", "a1", "a2", "a3"]):
                cache.clock.now += 1
                adapter = cache.acquire_adapter(name)
                tokens = [i] * 8 + [round_] * 8
                match = cache.match_prefix(name, tokens)
                if round_ == 0:
                    blocks = kv_blocks(4, 10.0 * i)
                    cache.insert_kv(name, tokens, blocks)
                    expected[name] = blocks
                else:
                    assert match.tokens >= 8
                    for got, want in zip(match.blocks, expected[name]):
                        assert torch.equal(got, want)
                cache.release(match)
                cache.release(adapter)
        assert cache.stats()["kv_hit_tokens_from_host"] > 0
        assert_healthy(cache)


# ---------------------------------------------------------------------- cost model and swapper


def test_the_cost_model_keeps_the_hot_adapter_and_evicts_cold_ones(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=3 * ADAPTER_BYTES) as cache:
        for _ in range(10):
            cache.clock.now += 0.1
            cache.release(cache.acquire_adapter("a0"))
        for name in ("a1", "a2", "a3", "a4", "a5"):
            cache.clock.now += 0.1
            cache.release(cache.acquire_adapter(name))
        on_device = {n.name for n in cache.tree.on_device}
        assert "a0" in on_device, "plain LRU would have evicted a0 first"
        assert cache.stats()["adapter_hits_device"] == 9


def make_a0_hot(cache) -> list[int]:
    """Five requests to a0 with one 16-token prompt, its KV inserted by the first; the prompt."""
    tokens = list(range(16))
    for _ in range(5):
        cache.clock.now += 0.2
        adapter = cache.acquire_adapter("a0")
        match = cache.match_prefix("a0", tokens)
        if not match.tokens:
            cache.insert_kv("a0", tokens, kv_blocks(4, 0.0))
        cache.release(match)
        cache.release(adapter)
    return tokens


def test_the_swapper_swaps_out_when_hbm_is_busy_and_prefetches_probable_kv_when_it_has_room(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=3 * ADAPTER_BYTES, headroom=0.4, swap_interval=1.0) as cache:
        tokens = make_a0_hot(cache)
        cache.clock.now += 0.2
        held = [cache.acquire_adapter(name) for name in ("a1", "a2", "a3")]  # a0's tree must leave HBM
        a0 = cache.tree.adapters["a0"]
        assert a0.dev is None and cache.stats()["kv_blocks"] == {"device": 0, "host_only": 4}
        for handle in held:
            cache.release(handle)
        cache.clock.now += 0.2
        adapter = cache.acquire_adapter("a0")  # on demand, in place of one of the others: HBM is full
        cache.clock.now += 1.0
        cache.rebalance()  # busy: swap out the least valuable leaves (cold adapters, not the held a0)
        assert cache.tree.device_bytes <= cache.hbm_bytes * 0.6
        assert {n.name for n in cache.tree.on_device} == {"a0"}
        assert cache.stats()["d2h_background_bytes"] == 0  # they had host copies: nothing to write back
        cache.clock.now += 1.0
        cache.rebalance()  # room: a0's hot blocks come in before anyone asks
        assert cache.stats()["prefetches"] == 4 and cache.stats()["h2d_prefetch_bytes"] == 4 * 256
        match = cache.match_prefix("a0", tokens)
        assert match.tokens == 16 and cache.stats()["kv_hit_tokens_from_host"] == 0
        cache.release(match)
        cache.release(adapter)
        assert_healthy(cache)


def test_the_swapper_prefetches_hot_kv_in_place_of_colder_device_leaves_when_hbm_has_no_free_room(adapters):
    root, _ = adapters
    with make_cache(root, hbm_bytes=4 * ADAPTER_BYTES, headroom=0.25) as cache:
        tokens = make_a0_hot(cache)
        held = [cache.acquire_adapter("a0")]
        for name in ("a1", "a2", "a3"):  # used once each, in this order: a0's blocks must leave HBM, a0 stays
            cache.clock.now += 0.1
            held.append(cache.acquire_adapter(name))
        for handle in held:
            cache.release(handle)
        assert cache.stats()["kv_blocks"] == {"device": 0, "host_only": 4}
        cache.clock.now += 0.2
        cache.rebalance()  # busy: a1 leaves, leaving no room beyond the headroom
        assert {n.name for n in cache.tree.on_device} == {"a0", "a2", "a3"}
        assert cache.hbm_bytes - cache.tree.device_bytes == cache.hbm_bytes * 0.25
        cache.rebalance()  # the hot blocks are worth more than a2, used once: it makes way for them
        assert cache.stats()["prefetches"] == 4 and cache.stats()["h2d_prefetch_bytes"] == 4 * 256
        assert {n.name for n in cache.tree.on_device if isinstance(n, AdapterNode)} == {"a0", "a3"}
        assert cache.stats()["d2h_background_bytes"] == 0  # a2 had a host copy
        cache.rebalance()  # a1 and a2 are worth no more than a3: nothing moves
        assert cache.stats()["prefetches"] == 4 and cache.tree.adapters["a3"].dev is not None
        adapter = cache.acquire_adapter("a0")
        match = cache.match_prefix("a0", tokens)
        assert match.tokens == 16 and cache.stats()["kv_hit_tokens_from_host"] == 0
        cache.release(match)
        cache.release(adapter)
        assert_healthy(cache)


def test_evictions_on_a_requests_path_prefer_blocks_that_need_no_write_back():
    tree = DependencyTree()
    model = CostModel(window=10.0, block_tokens=4, prefill_token_s=1e-4, bandwidth=lambda kind: 1e9)
    adapter = AdapterNode(name="a", nbytes=100)
    tree.adapters["a"] = adapter
    tree.set_device(adapter, torch.zeros(100, dtype=torch.uint8))
    hot_dirty = tree.add_kv(adapter, b"dirty", nbytes=100, dtype=torch.uint8, shape=(100,))
    tree.set_device(hot_dirty, torch.zeros(100, dtype=torch.uint8))
    cold_clean = tree.add_kv(adapter, b"clean", nbytes=100, dtype=torch.uint8, shape=(100,))
    tree.set_device(cold_clean, torch.zeros(100, dtype=torch.uint8))
    tree.set_host(cold_clean, object())
    model.request(0.0)
    model.use(cold_clean, 0.0)
    for t in range(1, 5):
        model.request(float(t))
        model.use(hot_dirty, float(t))
    model.request(5.0)
    assert model.probability(hot_dirty, 5.0) > model.probability(cold_clean, 5.0)
    assert next(device_victims(tree, model, 5.0)) is cold_clean
    hot_clean_value = model.device_value(hot_dirty, 5.0)
    assert model.device_value(hot_dirty, 5.0, on_path=True) > hot_clean_value
    cold_dirty = tree.add_kv(hot_dirty, b"cold", nbytes=100, dtype=torch.uint8, shape=(100,))
    tree.set_device(cold_dirty, torch.zeros(100, dtype=torch.uint8))  # never used since it came
    assert next(device_victims(tree, model, 5.0)) is cold_dirty  # ahead of need: coldest first
    assert next(device_victims(tree, model, 5.0, on_path=True)) is cold_clean  # on the path: no write-back first
    order = list(device_victims(tree, model, 5.0, keep={adapter}))
    assert order[:1] == [cold_dirty] and adapter not in order  # leaves only, parents once their children left


# ---------------------------------------------------------------------- sources


def test_adapters_through_an_fsspec_url_and_through_a_cache(adapters):
    root, tensors = adapters
    memory = fsspec.filesystem("memory")
    for name in ("a0", "a1"):
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            memory.pipe_file(f"/lora-test/{name}/{file}", (root / name / file).read_bytes())
    with make_cache("memory://lora-test") as cache:
        adapter = cache.acquire_adapter("a0")
        assert all(torch.equal(adapter[k], v) for k, v in tensors["a0"].items())
        with pytest.raises(KeyError):
            cache.acquire_adapter("a4")
    engine = Cache(fsspec.filesystem("file"), root=str(root))
    with make_cache(engine) as cache:
        cache.acquire_adapter("a1")
        assert engine.stats()["remote_bytes"] > 0
    engine.read("a1/adapter_config.json")  # the cache did not close an engine it was given
    engine.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_cache(str(root / "missing"))


def test_without_a_daemon_the_daemon_source_fails_clearly(adapters, tmp_path, monkeypatch):
    pytest.importorskip("igtcache.daemon_client")
    monkeypatch.setenv("IGTCACHE_SOCKET", str(tmp_path / "no.sock"))
    with pytest.raises(Exception, match="no igtcache daemon"):
        make_cache("igtcache::file:///nowhere")


@pytest.mark.timeout(60)
def test_adapters_through_the_node_daemon(adapters, tmp_path, monkeypatch):
    pytest.importorskip("igtcache.daemon.serve")
    root, tensors = adapters
    socket_path = tmp_path / "d.sock"
    remote = f"file://{root.parent}"
    daemon = subprocess.Popen([sys.executable, "-m", "igtcache.cli", "serve", "--remote", remote,
                               "--socket", str(socket_path), "--cache-dir", str(tmp_path / "cache")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert socket_path.exists(), "the daemon did not start"
        monkeypatch.setenv("IGTCACHE_SOCKET", str(socket_path))
        with make_cache(f"igtcache::{remote}/{root.name}") as cache:
            adapter = cache.acquire_adapter("a3")
            assert all(torch.equal(adapter[k], v) for k, v in tensors["a3"].items())
            with pytest.raises(KeyError):
                cache.acquire_adapter("zz")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


# ---------------------------------------------------------------------- concurrency


@pytest.mark.timeout(60)
def test_threads_share_one_cache(adapters):
    root, tensors = adapters
    with make_cache(root, hbm_bytes=8 * ADAPTER_BYTES, clock=time.monotonic, swap_interval=0.001) as cache:
        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(150):
                name = rng.choice(list(tensors))
                adapter = cache.acquire_adapter(name)
                tokens = [rng.randrange(3) for _ in range(8)]
                match = cache.match_prefix(name, tokens)
                cache.insert_kv(name, tokens, match.blocks + kv_blocks(2 - len(match.blocks), 0.0))
                assert torch.equal(adapter[next(iter(tensors[name]))], next(iter(tensors[name].values())))
                cache.release(match)
                cache.release(adapter)

        assert in_threads(worker, 4) == []
        assert_healthy(cache)
        assert all(node.refs == 0 for node in cache.tree.nodes())


def test_the_lora_benchmark_runs_and_reports_its_figures(capsys):
    from igtcache.bench import lora

    assert lora.main(["--requests", "300", "--adapters", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for text in ("vLLM-style", "in hindsight", "S-LoRA-style", "dependency tree", "KV hit", "TTFT", "host->device bandwidth"):
        assert text in out
