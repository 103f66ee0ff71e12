"""The AccessStreamTree: granularities, jobs, adaptation, pruning and bounds."""

from __future__ import annotations

import numpy as np
import pytest

from igtcache.bench.streams import cluster_workload, phase_change, zipf
from igtcache.patterns import Pattern
from igtcache.stream_tree import AccessStreamTree

B = 4 << 20  # the default block size
SEQ, RND, SKW, UNK = Pattern.SEQUENTIAL, Pattern.RANDOM, Pattern.SKEWED, Pattern.UNKNOWN


def read_file(tree, path, blocks, job="j", chunk=B, start=0):
    for offset in range(start, start + blocks * B, chunk):
        tree.record(path, offset, chunk, job=job)


def test_shuffled_directory_of_scanned_files():
    tree, rng = AccessStreamTree(), np.random.default_rng(0)
    for _ in range(2):
        for i in rng.permutation(200):
            read_file(tree, f"ds/train/f{i:04d}.bin", 12, chunk=B // 2)
    assert tree.pattern("ds/train", "j") is RND
    assert all(tree.pattern(f"ds/train/f{i:04d}.bin", "j") is SEQ for i in range(200))
    level = tree.act_level("ds/train/f0007.bin", "j")
    assert (level.path, level.level, level.label) == ("ds/train/f0007.bin", "file", SEQ)
    assert [lv.path for lv in tree.levels("ds/train/f0007.bin", "j")] == [
        "", "ds", "ds/train", "ds/train/f0007.bin"]


def test_name_order_scan_is_sequential_at_the_directory():
    tree = AccessStreamTree()
    for i in range(300):
        read_file(tree, f"ds/val/part-{i:05d}", 3)
    assert tree.pattern("ds/val", "j") is SEQ
    level = tree.act_level("ds/val/part-00042", "j")
    assert (level.path, level.level) == ("ds/val", "dir")


def test_name_order_is_plain_string_order_like_sorted_listdir():
    tree = AccessStreamTree()
    for name in sorted(f"img_{i}.jpg" for i in range(200)):  # img_1, img_10, img_100, ...
        tree.record(f"imgs/{name}", 0, 100_000, job="j")
    assert tree.pattern("imgs", "j") is SEQ


def test_small_files_cost_no_file_nodes():
    tree = AccessStreamTree()
    for i in np.random.default_rng(1).permutation(500):
        tree.record(f"d/{i}.jpg", 0, 150_000, job="j")
    assert len(tree) == 1 and tree.pattern("d", "j") is RND
    assert tree.pattern("d/7.jpg") is UNK and tree.act_level("d/7.jpg", "j").path == "d"


def test_big_file_read_at_zipf_offsets_is_skewed():
    tree, rng = AccessStreamTree(), np.random.default_rng(2)
    for b in zipf(2000, rng, alpha=1.1, n=8000).items.tolist():
        tree.record("emb/table.bin", b * B + 4096, 65536, job="j")
    assert tree.pattern("emb/table.bin", "j") is SKW
    assert tree.act_level("emb/table.bin", "j").label is SKW


def test_skewed_ancestor_of_whole_object_loads():
    tree, loads = AccessStreamTree(), zipf(100, np.random.default_rng(3), alpha=1.3, n=3000).items
    for a in loads.tolist():
        read_file(tree, f"lora/a{a:03d}/adapter.bin", 3, chunk=B // 4)
    hot = f"lora/a{int(np.bincount(loads).argmax()):03d}"
    assert tree.pattern("lora", "j") is SKW
    level = tree.skewed_ancestor(f"{hot}/adapter.bin", "j")
    assert (level.path, level.label) == ("lora", SKW)
    assert tree.skewed_ancestor(f"{hot}/adapter.bin", "another job") is None
    read_file(tree, "flat/one.bin", 3)
    assert tree.skewed_ancestor("flat/one.bin", "j") is None


def test_workers_at_different_places_of_a_big_file_make_region_streams():
    tree = AccessStreamTree(region_size=64 * B)
    cursors = [w * 64 * B for w in range(16)]  # 16 workers, one region each
    for _ in range(40):
        for w in range(16):
            tree.record("big.bin", cursors[w], B, job="j")
            cursors[w] += B
    for w in range(16):
        assert tree.pattern("big.bin", "j", offset=w * 64 * B + 5 * B) is SEQ
    level = tree.act_level("big.bin", "j", offset=3 * 64 * B)
    assert (level.level, level.region, level.label) == ("region", 3, SEQ)


def test_jobs_do_not_blur_each_other():
    tree, rng = AccessStreamTree(), np.random.default_rng(3)
    order = rng.permutation(300)
    for i in range(300):
        tree.record(f"ds/f{i:04d}", 0, 1000, job="scan")
        tree.record(f"ds/f{order[i]:04d}", 0, 1000, job="shuffle")
    assert tree.pattern("ds", "scan") is SEQ and tree.pattern("ds", "shuffle") is RND
    assert {s["job"] for s in tree.streams() if s["path"] == "ds"} == {"scan", "shuffle"}
    blurred = AccessStreamTree()  # one stream: the shuffled reader disappears
    for i in range(300):
        blurred.record(f"ds/f{i:04d}", 0, 1000)
        blurred.record(f"ds/f{order[i]:04d}", 0, 1000)
    assert [s["job"] for s in blurred.streams() if s["path"] == "ds"] == [None]


def test_pattern_without_job_is_the_best_evidenced_label():
    tree = AccessStreamTree()
    read_file(tree, "f", 100, job="a")
    read_file(tree, "f", 20, job="b", start=500 * B)
    assert tree.pattern("f") is SEQ and tree.pattern("f", "nobody") is UNK
    assert tree.pattern("never/seen") is UNK and tree.pattern("") is UNK


@pytest.mark.parametrize("first,second,label", [
    ("sequential", "uniform", RND),
    ("uniform", "sequential", SEQ),
    ("uniform", "hotset", SKW),
    ("hotset", "uniform", RND),
])
def test_labels_follow_a_phase_change_within_the_bound(first, second, label):
    window = 128
    tree, rng = AccessStreamTree(window=window), np.random.default_rng(4)
    stream = phase_change(first, second, 4 * window, rng)
    items = stream.items.tolist()
    before = None
    for i, item in enumerate(items):
        tree.record("f", item * B, 4096, job="j", ts=float(i))
        if i == len(items) // 2 - 1:
            before = tree.info("f", "j")
    after = tree.info("f", "j")
    assert before["label"] != label.value and after["label"] == label.value
    # Relabelled within window + window // 2 visits of the change, and it says when.
    assert 4 * window <= after["label_since"] <= 4 * window + window + window // 2
    assert after["label_since_visit"] > before["visits"]


def test_a_moving_hot_set_stays_skewed():
    tree, rng = AccessStreamTree(window=128), np.random.default_rng(5)
    stream = phase_change("hotset", "hotset", 512, rng)
    labels = []
    for i, item in enumerate(stream.items.tolist()):
        tree.record("f", item * B, 4096, job="j")
        if i >= 256 and i % 64 == 0:
            labels.append(tree.pattern("f", "j"))
    assert set(labels) == {SKW}


def test_streams_lists_active_streams_with_rates():
    tree = AccessStreamTree()
    for i in range(1, 65):  # (block 0 alone would not make a file node)
        tree.record("data/a.bin", i * B, B, job="j", ts=i * 0.5)
    tree.record("data/b.bin", 5 * B, B, job="j", ts=100.0)
    listed = tree.streams()
    assert [(s["path"], s["level"]) for s in listed] == [("data/a.bin", "file")]
    s = listed[0]
    assert s["job"] == "j" and s["label"] == "sequential" and s["region"] is None
    assert s["samples"] == s["visits"] == s["accesses"] == 64
    assert s["rate"] == pytest.approx(2.0) and s["byte_rate"] == pytest.approx(2.0 * B)
    assert s["label_since_visit"] == 8
    assert len(tree.streams(min_samples=1)) == 5  # + b.bin, data/ and the root (a, b)
    assert len(tree.streams(limit=2, min_samples=1)) == 2
    assert tree.streams(min_samples=1)[0]["path"] in ("data/b.bin", "data", "")


def test_per_stream_memory_is_bounded():
    tree = AccessStreamTree(window=64, max_jobs=3)
    for job in range(10):
        for i in range(1000):
            tree.record("f", (i % 500) * B, B, job=job)
    node = tree._nodes["f"]
    assert len(node.streams) == 3 and set(node.streams) == {7, 8, 9}
    assert all(len(s.items) == 64 for s in node.streams.values())


def test_cold_nodes_are_pruned_least_recently_touched_first():
    tree = AccessStreamTree(max_nodes=50)
    for i in range(200):
        read_file(tree, f"d{i // 20}/f{i}", 2)
        if i % 10 == 0:
            read_file(tree, "hot/f", 2)  # kept warm
        assert len(tree) <= 50
    assert "hot/f" in tree and "hot" in tree and "d9/f199" in tree
    assert "d0/f0" not in tree and "d0" not in tree
    assert tree.info("d0/f0") is None and tree.pattern("d0/f0") is UNK


def test_directories_of_small_files_are_pruned_too():
    tree = AccessStreamTree(max_nodes=20)
    for i in range(1000):
        tree.record(f"a/d{i:04d}/x.jpg", 0, 1000)
        assert len(tree) <= 20
    assert "a/d0999" in tree and "a" in tree and "a/d0000" not in tree


def test_a_path_used_as_file_and_prefix():
    tree = AccessStreamTree()
    read_file(tree, "/a/b", 3)
    assert tree.levels("a/b")[-1].level == "file"  # leading slash ignored
    tree.record("a/b/c", B, B)
    assert tree.levels("a/b/c")[-2:] == [("a/b", "dir", None, UNK), ("a/b/c", "file", None, UNK)]
    tree.record("a/b", B, B)  # a directory now: not recorded
    tree.record("", 0, 1)
    assert tree.pattern("a/b") is UNK


def stored_visits(tree) -> int:
    nodes = [tree._root, *tree._nodes.values()]
    return sum(len(s.items) for node in nodes for s in node.streams.values())


def test_bound_holds_over_a_hundred_thousand_files():
    # (The benchmark replays a million accesses; this keeps the suite fast.)
    tree, rng = AccessStreamTree(max_nodes=4096, window=128, max_jobs=2), np.random.default_rng(6)
    bound = (4096 + 1) * 2 * 128
    order = rng.permutation(100_000).tolist()
    for i in range(300_000):
        k = order[i % 100_000]
        tree.record(f"s{k // 1000:03d}/f{k:06d}", (1 + i // 100_000) * B, B, job=i % 3, ts=i)
        if i % 50_000 == 49_999:
            assert len(tree) <= 4096 and stored_visits(tree) <= bound
    assert len(tree) == 4096


def test_mixed_cluster_workload_labels():
    tree = AccessStreamTree(max_nodes=8192)
    for i, (path, offset, size, job) in enumerate(cluster_workload(200_000, 100_000, seed=7)):
        tree.record(path, offset, size, job, ts=i * 1e-4)
    assert len(tree) <= 8192
    labels = {(s["level"], s["job"], s["label"]) for s in tree.streams()}
    assert ("dir", "train", "random") in labels and ("dir", "eval", "sequential") in labels
    assert ("region", "tokens", "sequential") in labels and ("file", "embed", "skewed") in labels
