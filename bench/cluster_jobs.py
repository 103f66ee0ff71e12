"""The cluster benchmark's workload: what every node's jobs read.

Each node runs two jobs. ``train``: rank ``r`` of a data-parallel training
job that, every epoch, reads its 1/N share (every N-th file from ``r``) of
one shuffled order of the training files that all ranks agree on.
``infer``: an inference server loading whole adapter files with Zipf
popularity, the same adapters hot on every node but each node drawing its
own sequence. Files are read whole, in one read each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from igtcache.bench.files import jittered_files

KiB, MiB = 1 << 10, 1 << 20
JOBS = ("train", "infer")
ZIPF_EXPONENT = 1.1

#: ``train_*``: the training set (files and their size) and epochs; ``adapters`` files of
#: ``adapter_size``, of which each node loads ``adapter_loads``.
SCALES = {
    "tiny": dict(train_files=64, train_size=128 * KiB, epochs=3, adapters=6, adapter_size=1 * MiB,
                 adapter_loads=12),
    "small": dict(train_files=512, train_size=256 * KiB, epochs=4, adapters=16, adapter_size=3 * MiB,
                  adapter_loads=48),
}


@dataclass
class ClusterWorkload:
    """The data set (key -> size) and, per node, each job's reads (``(key, 0)``: whole files)."""

    sizes: dict[str, int]
    nodes: list[dict[str, list[tuple[str, int]]]]

    @property
    def dataset_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def distinct_bytes(self) -> int:
        """Bytes of the distinct files some job on some node reads."""
        keys = {key for node in self.nodes for reads in node.values() for key, _ in reads}
        return sum(self.sizes[key] for key in keys)


def workload(scale: str, nodes: int, seed: int = 0) -> ClusterWorkload:
    """The workload at ``scale`` on ``nodes`` nodes; sizes are jittered so none is a multiple of a block."""
    p = SCALES[scale]
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}

    train = jittered_files(rng, sizes, "train", p["train_files"], p["train_size"])
    adapters = jittered_files(rng, sizes, "adapters", p["adapters"], p["adapter_size"])
    orders = [rng.permutation(len(train)) for _ in range(p["epochs"])]
    weights = 1.0 / np.arange(1, len(adapters) + 1) ** ZIPF_EXPONENT
    per_node = []
    for rank in range(nodes):
        picks = rng.choice(len(adapters), size=p["adapter_loads"], p=weights / weights.sum())
        per_node.append({
            "train": [(train[i], 0) for order in orders for i in order[rank::nodes]],
            "infer": [(adapters[i], 0) for i in picks],
        })
    return ClusterWorkload(sizes, per_node)
