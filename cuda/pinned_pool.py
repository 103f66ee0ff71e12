"""A host block pool allocated once (pinned where CUDA is present) with async copies to and from the device.

The pool is one buffer of exactly ``capacity`` bytes, registered with CUDA
once, cut into blocks of ``block_bytes``. ``alloc`` hands out a ``HostBuffer``:
a list of runs of whole blocks, one run when a contiguous stretch is free,
several otherwise, so the pool never fragments into unusable holes. Copies go
through a copier (``copier.py``): on a dedicated CUDA stream ordered by events,
or synchronous on the CPU when CUDA is absent; the API is the same.

Reuse guard: a buffer remembers the last copy that touched it (copies run in
order on one stream, so the last is the latest to finish). ``free`` of a
buffer whose copy is still in flight parks its blocks until that copy is done;
``alloc`` takes parked blocks back only after their copy has finished, waiting
for it when nothing else is free. ``write``/``read`` wait for the buffer's own
copy first.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from igtcache.cuda.copier import CpuCopier, CudaCopier, Transfer, make_copier

KiB = 1 << 10
# Bandwidth estimates forget old copies with this weight per copy.
_BANDWIDTH_DECAY = 0.9


class PoolFull(MemoryError):
    """The pool has too few free bytes right now."""


@dataclass(eq=False)
class HostBuffer:
    """``nbytes`` of the pool, held in ``runs`` of ``(byte offset in the pool, byte length)``."""

    nbytes: int
    runs: list[tuple[int, int]]
    last: Transfer | None = field(default=None, repr=False)
    freed: bool = False


class PinnedBlockPool:
    """Host memory for swapped-out data, and the copies between it and the device.

    ``device`` is ``"cuda"`` (or ``"cuda:N"``), ``"cpu"``, or ``None`` for CUDA
    when available, else the CPU fallback (plain memory, synchronous copies).
    """

    def __init__(
        self,
        capacity: int,
        *,
        device: str | torch.device | None = None,
        block_bytes: int = 64 * KiB,
        copier: CpuCopier | CudaCopier | None = None,
    ) -> None:
        if capacity < 0 or block_bytes <= 0:
            raise ValueError(f"capacity must be >= 0 and block_bytes > 0, got {capacity} and {block_bytes}")
        self.copier = copier if copier is not None else make_copier(device)
        self.device: torch.device = self.copier.device
        self.capacity = capacity
        self.block_bytes = block_bytes
        self._arena = self.copier.host_memory(capacity)
        self._bytes = self._arena.numpy()
        self._blocks = -(-capacity // block_bytes)
        self._free: list[tuple[int, int]] = [(0, self._blocks)] if self._blocks else []  # (first block, count), sorted
        self._free_bytes = capacity
        self._parked: deque[tuple[Transfer, list[tuple[int, int]]]] = deque()
        self._parked_bytes = 0
        self._outstanding: deque[tuple[str, Transfer]] = deque()
        self._rates = {"h2d": [0.0, 0.0], "d2h": [0.0, 0.0]}  # decayed bytes, decayed seconds
        self.copied = {"h2d": 0, "d2h": 0}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pinned(self) -> bool:
        """Whether the pool's memory is page-locked (CUDA path)."""
        return self.copier.pinned

    @property
    def free_bytes(self) -> int:
        """Bytes ``alloc`` can hand out now or once in-flight copies finish."""
        return self._free_bytes + self._parked_bytes

    # ------------------------------------------------------------------ allocation

    def alloc(self, nbytes: int) -> HostBuffer:
        """A buffer of ``nbytes``; ``PoolFull`` when the free blocks cannot hold it."""
        self._check_open()
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes asked of a host pool of {self.capacity} bytes")
        with self._lock:
            self._reclaim(nbytes)
            if self._free_bytes < nbytes:
                raise PoolFull(f"host pool: {nbytes} bytes asked, {self._free_bytes} free of {self.capacity}")
            return HostBuffer(nbytes, self._take(nbytes))

    def free(self, buffer: HostBuffer) -> None:
        """Give a buffer back; its blocks are reused only after its last copy has finished."""
        if buffer.freed:
            raise ValueError("buffer freed twice")
        buffer.freed = True
        blocks = [self._block_span(offset, length) for offset, length in buffer.runs]
        with self._lock:
            if buffer.last is not None and not buffer.last.done():
                self._parked.append((buffer.last, blocks))
                self._parked_bytes += sum(self._span_bytes(*span) for span in blocks)
            else:
                self._give_back(blocks)

    def _take(self, nbytes: int) -> list[tuple[int, int]]:
        """Byte runs for ``nbytes``: the first free stretch that holds it all, else the largest stretches."""
        need = -(-nbytes // self.block_bytes)
        if need == 0:
            return []
        order = [i for i, (_, count) in enumerate(self._free) if count >= need][:1]
        if not order:
            order = sorted(range(len(self._free)), key=lambda i: -self._free[i][1])
        runs, taken, remaining = [], [], nbytes
        for i in order:
            first, count = self._free[i]
            use = min(count, -(-remaining // self.block_bytes))
            start = first * self.block_bytes
            length = min(remaining, self._span_bytes(first, use))
            runs.append((start, length))
            taken.append((i, use))
            remaining -= length
            if remaining <= 0:
                break
        for i, use in sorted(taken, reverse=True):
            first, count = self._free[i]
            if use == count:
                del self._free[i]
            else:
                self._free[i] = (first + use, count - use)
        self._free_bytes -= sum(self._span_bytes(*self._block_span(offset, length)) for offset, length in runs)
        return runs

    def _give_back(self, spans: list[tuple[int, int]]) -> None:
        for first, count in spans:
            self._free_bytes += self._span_bytes(first, count)
            i = bisect.bisect(self._free, (first, count))
            if i < len(self._free) and first + count == self._free[i][0]:
                count += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == first:
                first, before = self._free.pop(i - 1)
                count += before
                i -= 1
            self._free.insert(i, (first, count))

    def _reclaim(self, wanted: int) -> None:
        """Take back parked blocks whose copy is done; wait for more while fewer than ``wanted`` bytes are free."""
        while self._parked:
            transfer, blocks = self._parked[0]
            if not transfer.done():
                if self._free_bytes >= wanted:
                    return
                transfer.synchronize()
            self._parked.popleft()
            self._parked_bytes -= sum(self._span_bytes(*span) for span in blocks)
            self._give_back(blocks)

    def _block_span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.block_bytes, -(-length // self.block_bytes)

    def _span_bytes(self, first: int, count: int) -> int:
        return min((first + count) * self.block_bytes, self.capacity) - first * self.block_bytes

    # ------------------------------------------------------------------ host-side access

    def write(self, buffer: HostBuffer, data, offset: int = 0) -> None:
        """Copy bytes-like ``data`` into ``buffer`` at ``offset`` (after the buffer's in-flight copy)."""
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > buffer.nbytes:
            raise ValueError(f"write of {len(view)} bytes at {offset} outside a buffer of {buffer.nbytes}")
        self._settle(buffer)
        source = np.frombuffer(view, dtype=np.uint8)
        for start, position, length in self._pieces(buffer, offset, len(view)):
            self._bytes[start:start + length] = source[position - offset:position - offset + length]

    def read(self, buffer: HostBuffer, offset: int = 0, size: int = -1) -> bytes:
        """Bytes of ``buffer`` (after its in-flight copy)."""
        size = buffer.nbytes - offset if size == -1 else size
        if offset < 0 or size < 0 or offset + size > buffer.nbytes:
            raise ValueError(f"read of {size} bytes at {offset} outside a buffer of {buffer.nbytes}")
        self._settle(buffer)
        return b"".join(self._bytes[start:start + length].tobytes() for start, _, length in self._pieces(buffer, offset, size))

    def _settle(self, buffer: HostBuffer) -> None:
        if buffer.freed:
            raise ValueError("buffer used after free")
        if buffer.last is not None:
            buffer.last.synchronize()

    @staticmethod
    def _pieces(buffer: HostBuffer, offset: int, size: int):
        """``(pool offset, buffer offset, length)`` for the part of each run inside ``[offset, offset+size)``."""
        position = 0
        for start, length in buffer.runs:
            lo, hi = max(offset, position), min(offset + size, position + length)
            if lo < hi:
                yield start + lo - position, lo, hi - lo
            position += length

    # ------------------------------------------------------------------ copies

    def to_device(self, buffer: HostBuffer, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Transfer]:
        """Start copying ``buffer`` to the device; returns the device byte tensor and the copy.

        Without ``out`` the tensor is new. Before the compute stream uses it,
        pass it to ``hand_over`` with the transfer.
        """
        self._check_open()
        if buffer.freed:
            raise ValueError("buffer used after free")
        if out is None:
            target, after_compute = self.copier.device_empty(buffer.nbytes), False
        else:
            if out.dtype != torch.uint8 or out.device != self.device or out.numel() < buffer.nbytes or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous uint8 tensor of >= {buffer.nbytes} elements on {self.device}")
            target, after_compute = out, True
        pairs, position = [], 0
        for start, length in buffer.runs:
            pairs.append((target[position:position + length], self._arena[start:start + length]))
            position += length
        transfer = self.copier.copy(pairs, to_device=True, after_compute=after_compute)
        buffer.last = transfer
        self._track("h2d", transfer)
        return target, transfer

    def to_host(self, source: torch.Tensor, buffer: HostBuffer) -> Transfer:
        """Start copying a contiguous device tensor's bytes into ``buffer``."""
        self._check_open()
        if buffer.freed:
            raise ValueError("buffer used after free")
        if source.device != self.device or not source.is_contiguous():
            raise ValueError(f"source must be a contiguous tensor on {self.device}")
        flat = source.reshape(-1).view(torch.uint8)
        if flat.numel() > buffer.nbytes:
            raise ValueError(f"{flat.numel()} bytes do not fit a buffer of {buffer.nbytes}")
        pairs, position = [], 0
        for start, length in buffer.runs:
            length = min(length, flat.numel() - position)
            if length <= 0:
                break
            pairs.append((self._arena[start:start + length], flat[position:position + length]))
            position += length
        transfer = self.copier.copy(pairs, to_device=False, after_compute=True)
        buffer.last = transfer
        self._track("d2h", transfer)
        return transfer

    def hand_over(self, tensor: torch.Tensor, transfer: Transfer | None = None) -> None:
        """Make a device tensor from this pool safe to use on the current stream.

        The stream waits for ``transfer`` on the GPU (the host does not block),
        and the tensor's memory is not reused until that stream's work queued
        so far is done with it.
        """
        self.copier.hand_over(tensor, transfer)

    def bandwidth(self, direction: str) -> float | None:
        """Measured bytes/s of ``"h2d"`` or ``"d2h"`` copies (recent copies weigh more); ``None`` before any."""
        with self._lock:
            self._poll()
            nbytes, seconds = self._rates[direction]
        return nbytes / seconds if seconds > 0 else None

    def _track(self, direction: str, transfer: Transfer) -> None:
        with self._lock:
            self.copied[direction] += transfer.nbytes
            self._outstanding.append((direction, transfer))
            self._poll()

    def _poll(self) -> None:
        """Fold finished copies into the bandwidth estimates (they finish in issue order)."""
        while self._outstanding and self._outstanding[0][1].done():
            direction, transfer = self._outstanding.popleft()
            seconds = transfer.seconds()
            if seconds:
                rate = self._rates[direction]
                rate[0] = rate[0] * _BANDWIDTH_DECAY + transfer.nbytes
                rate[1] = rate[1] * _BANDWIDTH_DECAY + seconds

    # ------------------------------------------------------------------ lifetime

    def synchronize(self) -> None:
        """Wait for every copy this pool issued."""
        with self._lock:
            for _, transfer in self._outstanding:
                transfer.synchronize()
            self._poll()

    def close(self) -> None:
        """Wait for in-flight copies and release the pool's memory registration."""
        if self._closed:
            return
        self.synchronize()
        self._closed = True
        self.copier.release_host_memory(self._arena)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("pool is closed")

    def __enter__(self) -> "PinnedBlockPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
