"""Synthetic AI-cluster traces: ``igtcache bench gen SCENARIO OUT.csv [--seed N] [options]``.

Writes the CSV trace format of :mod:`igtcache.bench.trace` (``-`` for stdout).
Sizes accept units (``64KiB``, ``1GiB``, ``400MB``). ``--scale X`` multiplies a
scenario's counts (files, shards, reads, loads, lookups) to make tiny test
traces or large benchmark ones; sizes stay as given. Each job has its own
clock: reading ``n`` bytes takes ``n / throughput`` seconds (throughput per
job), and concurrent jobs are merged by timestamp. Paths start with the
scenario's name and job ids are ``SCENARIO-N`` (``SCENARIO-ROLE-N`` where a
scenario has jobs of several kinds), so scenarios never collide.
Same seed, same options: the same trace.

Scenarios and their options (defaults in brackets):

preprocess
    Data-preparation jobs scanning large raw files once, front to back; files
    are split among jobs. --jobs [2] --files [32] --file-size [256MiB]
    --read-size [1MiB] --throughput [400MB].
imagefolder
    Training on a folder of small images (ImageNet-like): every epoch reads
    every file whole, in a fresh shuffled order split among data-parallel
    ranks. --jobs [2] --files [20000] --classes [100] --mean-size [112KiB]
    (log-normal) --epochs [3] --read-size [1MiB] --throughput [100MB].
shards
    Shard-based training (WebDataset-like): every epoch shuffles the shard
    order, splits it among ranks, and each rank reads its shards
    sequentially. --jobs [2] --shards [64] --shard-size [128MiB] --epochs [3]
    --read-size [1MiB] --throughput [200MB].
records
    Record-level random reads in one big file (indexed dataset): uniform
    record choice. --jobs [2] --reads [50000] --file-size [8GiB]
    --record-size [64KiB] --throughput [50MB].
models
    Inference servers loading model and adapter files whole, with Zipf
    popularity: each server loads a base model first, then a stream of
    loads, a share of them base models, the rest LoRA adapters.
    --jobs [4] --loads [2000] --models [4] --model-size [2GiB] --adapters [256]
    --adapter-size [16MiB] --model-share [0.01] --zipf [1.0]
    --interval [0.5] (mean idle seconds between loads) --read-size [16MiB]
    --throughput [1GB].
features
    Feature-store lookups: rows of a few table files with Zipf popularity;
    every --shift-every lookups, a --shift fraction of the hottest 1% of
    rows is swapped for random rows (the hot set drifts).
    --jobs [4] --lookups [100000] --tables [4] --table-size [1GiB]
    --row-size [4KiB] --zipf [0.9] --shift-every [20000] --shift [0.5]
    --throughput [20MB].
loop
    A looping scan larger than a typical cache: the same files read in the
    same order again and again (repeated evaluation passes).
    --jobs [1] --files [8] --file-size [1GiB] --loops [4] --read-size [4MiB]
    --throughput [500MB].
cluster-train
    Data-parallel training on --nodes nodes (a cluster trace: jobs are
    nodeK/train-R): every epoch shuffles the dataset's files and splits the
    order among all ranks, each reading its files whole. --nodes [16]
    --jobs [1] (ranks per node) --files [2048] --file-size [4MiB]
    --epochs [40] --read-size [4MiB] --throughput [1600MB] (the whole job's,
    all ranks together).
cluster-adapters
    Adapter serving on --nodes nodes (jobs nodeK/serve-R): loads arrive at
    --rate per second across the cluster; each goes to a random server and
    reads a LoRA adapter, drawn from one Zipf popularity, whole and front to
    back.
    --nodes [16] --jobs [1] (servers per node) --loads [25600] --adapters [1024]
    --adapter-size [8MiB] --zipf [1.0] --rate [100] --read-size [4MiB]
    --throughput [1GB] (per server).
inference
    An inference node: servers load LoRA adapters whole, front to back in
    pieces, each load choosing among --adapters by Zipf popularity, beside
    embedding lookups: small records of one table with Zipf popularity over
    record ids (hot ids are neighbours, as in a frequency-sorted
    vocabulary), whose hot set moves elsewhere in the table once, part way.
    Lookups are spread evenly over the servers' run. --jobs [2] (servers)
    --loads [3000] --adapters [200] --adapter-size [16MiB] --zipf [1.0]
    --interval [0.1] (mean idle seconds between a server's loads)
    --read-size [1MiB] --throughput [200MB] (per server) --lookups [200000]
    --table-size [512MiB] --record-size [4KiB] --table-zipf [1.0]
    --shift-at [0.5] (fraction of the lookups before the hot set moves).
mix
    Several scenarios at once with their default options (and --scale), each
    stretched in time to span the same duration, so they run concurrently
    with interleaved timestamps. --of [all of the above].
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable, ClassVar, Iterable, Iterator

from igtcache.bench.cluster_traces import node_job
from igtcache.bench.trace import TraceRow, TraceWriter
from igtcache.sizes import format_size, size_argument

KiB, MiB, GiB = 1024, 1024**2, 1024**3
MB, GB = 1000**2, 1000**3


def _opt(default, help: str, kind: str):
    return field(default=default, metadata={"help": help, "kind": kind})


def _count(default: int, help: str):
    """An integer option multiplied by ``--scale``."""
    return _opt(default, help, "count")


def _size(default: int, help: str):
    """A byte-size option (accepts units)."""
    return _opt(default, help, "size")


def _integer(default: int, help: str):
    """A positive integer option."""
    return _opt(default, help, "int")


def _number(default: float, help: str):
    """A non-negative real option."""
    return _opt(default, help, "float")


def _fraction(default: float, help: str):
    """A real option in [0, 1]."""
    return _opt(default, help, "fraction")


class _Clock:
    """A job's time: reading ``n`` bytes takes ``n / throughput`` seconds."""

    def __init__(self, start: float, throughput: float) -> None:
        self.t = start
        self.throughput = throughput

    def read(self, nbytes: int) -> float:
        ts = self.t
        self.t += nbytes / self.throughput
        return ts


def _scan(clock: _Clock, job: str, path: str, object_size: int, read_size: int) -> Iterator[TraceRow]:
    """Read a whole object front to back in ``read_size`` pieces."""
    for offset in range(0, object_size, read_size):
        n = min(read_size, object_size - offset)
        yield TraceRow(clock.read(n), job, path, offset, n, object_size)


def _merge(streams: Iterable[Iterable[TraceRow]]) -> Iterator[TraceRow]:
    return heapq.merge(*streams, key=itemgetter(0))


def _zipf_cum_weights(n: int, exponent: float) -> list[float]:
    return list(itertools.accumulate((r + 1) ** -exponent for r in range(n)))


def _zipf_picks(rng: random.Random, n: int, exponent: float, k: int) -> list[int]:
    """``k`` choices among ``range(n)`` by Zipf popularity, the popularity ranks shuffled over the ids."""
    weights = _zipf_cum_weights(n, exponent)
    ids = rng.sample(range(n), n)  # popularity rank -> id
    return [ids[rank] for rank in rng.choices(range(n), cum_weights=weights, k=k)]


@dataclass
class Scenario:
    """A workload: options as dataclass fields, rows from :meth:`rows`."""

    name: ClassVar[str] = ""
    jobs: int = _integer(1, "concurrent jobs")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            option = "--" + f.name.replace("_", "-")
            if kind in ("count", "int", "size") and value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
            if kind == "float" and not value >= 0:
                raise ValueError(f"{option} must be >= 0, got {value}")
            if kind == "fraction" and not 0 <= value <= 1:
                raise ValueError(f"{option} must be between 0 and 1, got {value}")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        raise NotImplementedError

    def scaled(self, scale: float) -> Scenario:
        """A copy with every count option multiplied by ``scale`` (at least 1)."""
        changes = {
            f.name: max(1, round(getattr(self, f.name) * scale))
            for f in dataclasses.fields(self)
            if f.metadata.get("kind") == "count"
        }
        return dataclasses.replace(self, **changes)

    def _job(self, j: int) -> str:
        return f"{self.name}-{j}"

    def _starts(self, rng: random.Random) -> list[float]:
        return [rng.uniform(0, 0.1) for _ in range(self.jobs)]


@dataclass
class Preprocess(Scenario):
    """Jobs scanning large raw files once, front to back; files split among jobs."""

    name: ClassVar[str] = "preprocess"
    jobs: int = _integer(2, "concurrent preprocessing jobs")
    files: int = _count(32, "raw files")
    file_size: int = _size(256 * MiB, "bytes per file")
    read_size: int = _size(1 * MiB, "bytes per read")
    throughput: int = _size(400 * MB, "bytes per second per job")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        starts = self._starts(rng)

        def job(j: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[j], self.throughput)
            for i in range(j, self.files, self.jobs):
                yield from _scan(clock, self._job(j), f"preprocess/part-{i:05d}.bin", self.file_size, self.read_size)

        return _merge(job(j) for j in range(self.jobs))


def _epoch_orders(rng: random.Random, count: int, epochs: int) -> list[list[int]]:
    """A fresh shuffle of ``range(count)`` for every epoch."""
    orders = []
    for _ in range(epochs):
        order = list(range(count))
        rng.shuffle(order)
        orders.append(order)
    return orders


@dataclass
class ImageFolder(Scenario):
    """Small files read whole, reshuffled every epoch, split among ranks."""

    name: ClassVar[str] = "imagefolder"
    jobs: int = _integer(2, "data-parallel ranks")
    files: int = _count(20000, "image files")
    classes: int = _integer(100, "class directories")
    mean_size: int = _size(112 * KiB, "mean file size (log-normal)")
    epochs: int = _integer(3, "passes over the data")
    read_size: int = _size(1 * MiB, "largest read")
    throughput: int = _size(100 * MB, "bytes per second per rank")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        sigma = 0.6
        mu = math.log(self.mean_size) - sigma**2 / 2
        sizes = [min(max(1024, int(rng.lognormvariate(mu, sigma))), 16 * self.mean_size) for _ in range(self.files)]
        paths = [f"imagefolder/train/c{i % self.classes:04d}/img{i:07d}.jpg" for i in range(self.files)]
        orders = _epoch_orders(rng, self.files, self.epochs)
        starts = self._starts(rng)

        def rank(j: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[j], self.throughput)
            for order in orders:
                for i in order[j :: self.jobs]:
                    yield from _scan(clock, self._job(j), paths[i], sizes[i], self.read_size)

        return _merge(rank(j) for j in range(self.jobs))


@dataclass
class Shards(Scenario):
    """Shards read sequentially, in a shuffled order every epoch, split among ranks."""

    name: ClassVar[str] = "shards"
    jobs: int = _integer(2, "data-parallel ranks")
    shards: int = _count(64, "shard files")
    shard_size: int = _size(128 * MiB, "bytes per shard")
    epochs: int = _integer(3, "passes over the data")
    read_size: int = _size(1 * MiB, "bytes per read")
    throughput: int = _size(200 * MB, "bytes per second per rank")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        orders = _epoch_orders(rng, self.shards, self.epochs)
        starts = self._starts(rng)

        def rank(j: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[j], self.throughput)
            for order in orders:
                for i in order[j :: self.jobs]:
                    yield from _scan(clock, self._job(j), f"shards/train-{i:05d}.tar", self.shard_size, self.read_size)

        return _merge(rank(j) for j in range(self.jobs))


@dataclass
class Records(Scenario):
    """Uniformly random record reads in one big file."""

    name: ClassVar[str] = "records"
    jobs: int = _integer(2, "concurrent readers")
    reads: int = _count(50000, "record reads in all")
    file_size: int = _size(8 * GiB, "bytes in the file")
    record_size: int = _size(64 * KiB, "bytes per record")
    throughput: int = _size(50 * MB, "bytes per second per reader")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        # Readers take turns, so one clock running ``jobs`` times faster keeps order.
        clock = _Clock(0.0, self.throughput * self.jobs)
        records = -(-self.file_size // self.record_size)
        for n in range(self.reads):
            offset = rng.randrange(records) * self.record_size
            size = min(self.record_size, self.file_size - offset)
            yield TraceRow(clock.read(size), self._job(n % self.jobs), "records/train.bin", offset, size, self.file_size)


@dataclass
class Models(Scenario):
    """Servers loading base models and LoRA adapters whole, with Zipf popularity."""

    name: ClassVar[str] = "models"
    jobs: int = _integer(4, "inference servers")
    loads: int = _count(2000, "file loads in all (besides each server's first model)")
    models: int = _integer(4, "base models")
    model_size: int = _size(2 * GiB, "bytes per base model")
    adapters: int = _integer(256, "LoRA adapters")
    adapter_size: int = _size(16 * MiB, "bytes per adapter")
    model_share: float = _fraction(0.01, "fraction of loads that are base models")
    zipf: float = _number(1.0, "Zipf exponent of popularity")
    interval: float = _number(0.5, "mean idle seconds between a server's loads")
    read_size: int = _size(16 * MiB, "bytes per read")
    throughput: int = _size(1 * GB, "bytes per second per server")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        model_weights = _zipf_cum_weights(self.models, self.zipf)
        adapter_weights = _zipf_cum_weights(self.adapters, self.zipf)
        model_ids = rng.sample(range(self.models), self.models)  # popularity rank -> model
        adapter_ids = rng.sample(range(self.adapters), self.adapters)

        def pick_model() -> str:
            i = model_ids[rng.choices(range(self.models), cum_weights=model_weights)[0]]
            return f"models/base-{i}/model.safetensors"

        plans: list[list[tuple[str, int]]] = [[(pick_model(), self.model_size)] for _ in range(self.jobs)]
        for n in range(self.loads):
            if rng.random() < self.model_share:
                load = (pick_model(), self.model_size)
            else:
                i = adapter_ids[rng.choices(range(self.adapters), cum_weights=adapter_weights)[0]]
                load = (f"models/adapters/lora-{i:04d}/adapter.safetensors", self.adapter_size)
            plans[rng.randrange(self.jobs)].append(load)
        gaps = [[rng.expovariate(1 / self.interval) if self.interval else 0.0 for _ in plan] for plan in plans]
        starts = self._starts(rng)

        def server(j: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[j], self.throughput)
            for (path, object_size), gap in zip(plans[j], gaps[j]):
                yield from _scan(clock, self._job(j), path, object_size, self.read_size)
                clock.t += gap

        return _merge(server(j) for j in range(self.jobs))


@dataclass
class Features(Scenario):
    """Zipf-popular row lookups in table files, with a drifting hot set."""

    name: ClassVar[str] = "features"
    jobs: int = _integer(4, "concurrent lookup jobs")
    lookups: int = _count(100000, "row lookups in all")
    tables: int = _integer(4, "table files")
    table_size: int = _size(1 * GiB, "bytes per table")
    row_size: int = _size(4 * KiB, "bytes per row")
    zipf: float = _number(0.9, "Zipf exponent of row popularity")
    shift_every: int = _count(20000, "lookups between hot-set shifts")
    shift: float = _fraction(0.5, "fraction of the hottest 1% of rows replaced at each shift")
    throughput: int = _size(20 * MB, "bytes per second per job")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        per_table = max(1, self.table_size // self.row_size)
        n = per_table * self.tables
        weights = _zipf_cum_weights(n, self.zipf)
        rows = list(range(n))  # popularity rank -> row
        rng.shuffle(rows)
        hot = max(1, n // 100)
        clock = _Clock(0.0, self.throughput * self.jobs)  # jobs take turns
        for start in range(0, self.lookups, self.shift_every):
            if start:
                for rank in range(hot):
                    if rng.random() < self.shift:
                        other = rng.randrange(n)
                        rows[rank], rows[other] = rows[other], rows[rank]
            ranks = rng.choices(range(n), cum_weights=weights, k=min(self.shift_every, self.lookups - start))
            for k, rank in enumerate(ranks, start):
                table, index = divmod(rows[rank], per_table)
                yield TraceRow(
                    clock.read(self.row_size), self._job(k % self.jobs), f"features/table-{table}.bin",
                    index * self.row_size, self.row_size, per_table * self.row_size,
                )


@dataclass
class Loop(Scenario):
    """The same files scanned in the same order, over and over."""

    name: ClassVar[str] = "loop"
    jobs: int = _integer(1, "concurrent looping jobs (each scans everything)")
    files: int = _count(8, "files in the loop")
    file_size: int = _size(1 * GiB, "bytes per file")
    loops: int = _integer(4, "passes")
    read_size: int = _size(4 * MiB, "bytes per read")
    throughput: int = _size(500 * MB, "bytes per second per job")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        starts = self._starts(rng)

        def job(j: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[j], self.throughput)
            for _ in range(self.loops):
                for i in range(self.files):
                    yield from _scan(clock, self._job(j), f"loop/eval-{i:03d}.bin", self.file_size, self.read_size)

        return _merge(job(j) for j in range(self.jobs))


SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (Preprocess, ImageFolder, Shards, Records, Models, Features, Loop)
}


@dataclass
class ClusterTrain(Scenario):
    """Data-parallel training on N nodes: each epoch's shuffled order of the files split among all ranks."""

    name: ClassVar[str] = "cluster-train"
    nodes: int = _integer(16, "nodes")
    jobs: int = _integer(1, "data-parallel ranks per node")
    files: int = _count(2048, "files in the dataset")
    file_size: int = _size(4 * MiB, "bytes per file")
    epochs: int = _integer(40, "passes over the data")
    read_size: int = _size(4 * MiB, "bytes per read")
    throughput: int = _size(1600 * MB, "bytes per second of the whole job, all ranks together")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        orders = _epoch_orders(rng, self.files, self.epochs)
        world = self.nodes * self.jobs
        starts = [rng.uniform(0, 0.1) for _ in range(world)]

        def rank(g: int) -> Iterator[TraceRow]:
            clock = _Clock(starts[g], self.throughput / world)
            job = node_job(g // self.jobs, f"train-{g % self.jobs}")
            for order in orders:
                for i in order[g::world]:
                    yield from _scan(clock, job, f"cluster-train/part-{i:06d}.bin", self.file_size, self.read_size)

        return _merge(rank(g) for g in range(world))


@dataclass
class ClusterAdapters(Scenario):
    """Adapter serving on N nodes: Zipf-popular LoRA adapters loaded whole by every node's servers."""

    name: ClassVar[str] = "cluster-adapters"
    nodes: int = _integer(16, "nodes")
    jobs: int = _integer(1, "serving processes per node")
    loads: int = _count(25600, "adapter loads in all, each by a random server")
    adapters: int = _integer(1024, "LoRA adapters")
    adapter_size: int = _size(8 * MiB, "bytes per adapter")
    zipf: float = _number(1.0, "Zipf exponent of popularity")
    rate: float = _number(100.0, "loads per second across the cluster, Poisson (0: all at once)")
    read_size: int = _size(4 * MiB, "bytes per read")
    throughput: int = _size(1 * GB, "bytes per second per server")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        servers = self.nodes * self.jobs
        plans: list[list[tuple[float, int]]] = [[] for _ in range(servers)]
        t = 0.0
        for adapter in _zipf_picks(rng, self.adapters, self.zipf, self.loads):
            t += rng.expovariate(self.rate) if self.rate else 0.0
            plans[rng.randrange(servers)].append((t, adapter))

        def server(s: int) -> Iterator[TraceRow]:
            clock = _Clock(0.0, self.throughput)
            job = node_job(s // self.jobs, f"serve-{s % self.jobs}")
            for arrival, i in plans[s]:
                clock.t = max(clock.t, arrival)  # a load waits for the server's previous one
                yield from _scan(clock, job, f"cluster-adapters/lora-{i:05d}/adapter.safetensors",
                                 self.adapter_size, self.read_size)

        return _merge(server(s) for s in range(servers))


@dataclass
class Inference(Scenario):
    """An inference node: Zipf-chosen adapters loaded whole, beside skewed embedding lookups."""

    name: ClassVar[str] = "inference"
    jobs: int = _integer(2, "serving processes")
    loads: int = _count(3000, "adapter loads in all, each by a random server")
    adapters: int = _integer(200, "LoRA adapters")
    adapter_size: int = _size(16 * MiB, "bytes per adapter")
    zipf: float = _number(1.0, "Zipf exponent of adapter popularity")
    interval: float = _number(0.1, "mean idle seconds between a server's loads")
    read_size: int = _size(1 * MiB, "bytes per adapter read")
    throughput: int = _size(200 * MB, "bytes per second per server")
    lookups: int = _count(200000, "embedding lookups in all")
    table_size: int = _size(512 * MiB, "bytes in the embedding table")
    record_size: int = _size(4 * KiB, "bytes per record")
    table_zipf: float = _number(1.0, "Zipf exponent of record popularity")
    shift_at: float = _fraction(0.5, "fraction of the lookups made before the hot set moves")

    def rows(self, rng: random.Random) -> Iterator[TraceRow]:
        plans: list[list[int]] = [[] for _ in range(self.jobs)]
        for adapter in _zipf_picks(rng, self.adapters, self.zipf, self.loads):
            plans[rng.randrange(self.jobs)].append(adapter)
        starts = self._starts(rng)

        def server(j: int) -> list[TraceRow]:
            clock, out = _Clock(starts[j], self.throughput), []
            for i in plans[j]:
                out += _scan(clock, f"{self.name}-serve-{j}", f"{self.name}/adapters/lora-{i:04d}/adapter.safetensors",
                             self.adapter_size, self.read_size)
                clock.t += rng.expovariate(1 / self.interval) if self.interval else 0.0
            return out

        serving = [server(j) for j in range(self.jobs)]
        duration = max((rows[-1].ts for rows in serving if rows), default=0.0)
        return _merge([*serving, self._lookups(rng, duration)])

    def _lookups(self, rng: random.Random, duration: float) -> Iterator[TraceRow]:
        """Record reads at an even pace over ``duration``; hot ids are neighbours, moved once."""
        records = max(1, self.table_size // self.record_size)
        table = records * self.record_size
        weights = _zipf_cum_weights(records, self.table_zipf)
        ranks = rng.choices(range(records), cum_weights=weights, k=self.lookups)
        shift = round(self.lookups * self.shift_at)
        bases = rng.randrange(records), rng.randrange(records)
        step = duration / self.lookups if duration else 0.0
        for n, rank in enumerate(ranks):
            record = (bases[n >= shift] + rank) % records
            yield TraceRow(n * step, f"{self.name}-embed-0", f"{self.name}/embeddings/table.bin",
                           record * self.record_size, self.record_size, table)


# Cluster traces name each job's node (igtcache.bench.cluster_traces); mix leaves them out.
CLUSTER_SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (ClusterTrain, ClusterAdapters)}
# Node scenarios stand alone: mix leaves them out, so its trace stays as it was.
NODE_SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (Inference,)}


def mix(names: Iterable[str], rng: random.Random, scale: float = 1.0,
        status: Callable[[str], None] | None = None) -> Iterator[TraceRow]:
    """Scenarios ``names`` (default options, scaled) running at once.

    Each is generated whole, then its timestamps are stretched to span the
    longest one's duration, and all are merged by timestamp. ``status``
    receives progress lines while the parts are generated.
    """
    parts = []
    for name in names:
        part = []
        for row in SCENARIOS[name]().scaled(scale).rows(random.Random(rng.random())):
            part.append(row)
            if status and len(part) % 10000 == 0:
                status(f"generating {name}, {len(part):,} rows")
        parts.append(part)
    duration = max((part[-1].ts for part in parts if part), default=0.0)
    return _merge(_stretch(part, duration) for part in parts)


def _stretch(rows: list[TraceRow], duration: float) -> Iterator[TraceRow]:
    end = rows[-1].ts if rows else 0.0
    factor = duration / end if end > 0 else 1.0
    return (row._replace(ts=row.ts * factor) for row in rows)


class _Progress:
    """Counts rows and bytes, reporting on stderr at most once a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self._last = time.monotonic()
        self.rows = 0
        self.nbytes = 0

    def update(self, row: TraceRow) -> None:
        self.rows += 1
        self.nbytes += row.size
        if self.rows % 4096 == 0:
            self.note(f"{self.rows:,} rows, {format_size(self.nbytes)} read, ts {row.ts:,.1f} s")

    def note(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            print(f"{self.label}: {text}", file=sys.stderr, flush=True)


def _size_text(n: int) -> str:
    """``n`` bytes as the shortest exact unit: ``134217728 -> "128MiB"``, ``200000000 -> "200MB"``."""
    for power in range(6, 0, -1):
        for base, suffix in ((1024, "iB"), (1000, "B")):
            if n % base**power == 0:
                return f"{n // base**power}{'KMGTPE'[power - 1]}{suffix}"
    return str(n)


def _add_options(parser: argparse.ArgumentParser, cls: type[Scenario]) -> None:
    types = {"count": int, "int": int, "size": size_argument, "float": float, "fraction": float}
    metavars = {"size": "SIZE", "float": "X", "fraction": "X"}
    for f in dataclasses.fields(cls):
        kind = f.metadata["kind"]
        default = _size_text(f.default) if kind == "size" else f.default
        scaled = ", times --scale" if kind == "count" else ""
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=types[kind], default=f.default,
            metavar=metavars.get(kind, "N"), help=f"{f.metadata['help']} (default {default}{scaled})",
        )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", metavar="OUT.csv", help="trace file to write ('-' for stdout)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common.add_argument("--scale", type=float, default=1.0, help="multiply every count option (default 1.0)")
    parser = argparse.ArgumentParser(
        prog="igtcache bench gen", description="Write a synthetic AI-cluster access trace.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, cls in {**SCENARIOS, **NODE_SCENARIOS, **CLUSTER_SCENARIOS}.items():
        _add_options(sub.add_parser(name, parents=[common], help=cls.__doc__, description=cls.__doc__), cls)
    mixed = sub.add_parser("mix", parents=[common], help="Several scenarios at once, interleaved.",
                           description=mix.__doc__.split("\n\n")[0])
    mixed.add_argument("--of", default=",".join(SCENARIOS), metavar="A,B,...",
                       help=f"scenarios to run together (default {','.join(SCENARIOS)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``igtcache bench gen``: write a trace; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    rng = random.Random(args.seed)
    progress = _Progress(f"gen {args.scenario}")
    if args.scenario == "mix":
        names = [n.strip() for n in args.of.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown or not names:
            parser.error(f"--of: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
        rows = mix(names, rng, args.scale, status=progress.note)
    else:
        cls = {**SCENARIOS, **NODE_SCENARIOS, **CLUSTER_SCENARIOS}[args.scenario]
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        try:
            scenario = cls(**options).scaled(args.scale)
        except ValueError as e:
            parser.error(str(e))
        rows = scenario.rows(rng)
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    objects: dict[str, int] = {}
    try:
        writer = TraceWriter(out)
        for row in rows:
            writer.write(row)
            objects[row.path] = row.object_size
            progress.update(row)
    finally:
        if out is not sys.stdout:
            out.close()
    elapsed = time.monotonic() - progress.started
    print(
        f"gen {args.scenario}: wrote {progress.rows:,} reads of {format_size(progress.nbytes)} over "
        f"{len(objects):,} objects ({format_size(sum(objects.values()))}) to {args.out} in {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
