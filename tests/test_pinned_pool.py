"""The pinned host block pool: allocation, host-side access, copies, the reuse guard, the CPU fallback.

The reuse guard is exercised with ``QueuedCopier``: copies queue up like work
on a CUDA stream and run, in order, only when someone waits for them, so a
test can free a buffer whose copy has not happened yet. The CUDA tests run
only where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from igtcache.cuda import CpuCopier, PinnedBlockPool, PoolFull, Transfer, make_copier

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class QueuedTransfer(Transfer):
    def __init__(self, copier: "QueuedCopier", nbytes: int) -> None:
        super().__init__(nbytes, 1e-6)
        self.copier = copier
        self.ran = False

    def done(self) -> bool:
        return self.ran

    def synchronize(self) -> None:
        self.copier.run_until(self)


class QueuedCopier(CpuCopier):
    """Copies that run in issue order, only when waited for (a stream the host never polls)."""

    def __init__(self) -> None:
        self.queue: list[tuple[QueuedTransfer, list]] = []

    def copy(self, pairs, *, to_device, after_compute):
        transfer = QueuedTransfer(self, sum(src.numel() for _, src in pairs))
        # snapshot nothing: like the GPU, the copy reads its source when it runs
        self.queue.append((transfer, pairs))
        return transfer

    def run_until(self, transfer: QueuedTransfer) -> None:
        while not transfer.ran:
            queued, pairs = self.queue.pop(0)
            for dst, src in pairs:
                dst.copy_(src)
            queued.ran = True


def test_pool_memory_is_exactly_the_capacity_asked():
    pool = PinnedBlockPool(1000, device="cpu", block_bytes=64)
    assert pool._arena.numel() == 1000
    buffers = [pool.alloc(64) for _ in range(15)] + [pool.alloc(40)]  # the last block is 40 bytes
    assert pool.free_bytes == 0
    with pytest.raises(PoolFull):
        pool.alloc(1)
    pool.free(buffers[3])
    assert pool.free_bytes == 64


def test_write_and_read_across_scattered_runs():
    pool = PinnedBlockPool(640, device="cpu", block_bytes=64)
    held = [pool.alloc(64) for _ in range(10)]
    for b in held[::2]:
        pool.free(b)  # five free blocks, none adjacent
    buffer = pool.alloc(300)
    assert len(buffer.runs) == 5
    data = bytes(range(256)) + bytes(44)
    pool.write(buffer, data)
    assert pool.read(buffer) == data
    pool.write(buffer, b"xyz", offset=62)  # across a run boundary
    assert pool.read(buffer, 60, 6) == data[60:62] + b"xyz" + data[65:66]


def test_freed_blocks_merge_back_into_one_contiguous_run():
    pool = PinnedBlockPool(1024, device="cpu", block_bytes=64)
    buffers = [pool.alloc(128) for _ in range(8)]
    for b in buffers[1::2] + buffers[::2]:
        pool.free(b)
    assert pool._free == [(0, 16)]
    assert pool.alloc(1024).runs == [(0, 1024)]


def test_copies_round_trip_tensors_of_any_dtype():
    pool = PinnedBlockPool(4096, device="cpu", block_bytes=128)
    for source in (torch.randn(7, 9), torch.arange(100, dtype=torch.int64), torch.rand(33) > 0.5,
                   torch.randn(5, 5).to(torch.bfloat16)):
        buffer = pool.alloc(source.nbytes)
        pool.to_host(source, buffer).synchronize()
        device, transfer = pool.to_device(buffer)
        transfer.wait()
        assert torch.equal(device.view(source.dtype).view(source.shape), source)
        pool.free(buffer)
    assert pool.copied["h2d"] == pool.copied["d2h"] > 0
    assert pool.bandwidth("h2d") > 0 and pool.bandwidth("d2h") > 0


def test_to_device_into_a_given_tensor():
    pool = PinnedBlockPool(256, device="cpu", block_bytes=64)
    buffer = pool.alloc(100)
    pool.write(buffer, bytes(range(100)))
    out = torch.zeros(128, dtype=torch.uint8)
    target, _ = pool.to_device(buffer, out=out)
    assert target is out and bytes(out[:100].tolist()) == bytes(range(100)) and not out[100:].any()
    with pytest.raises(ValueError, match="contiguous uint8"):
        pool.to_device(buffer, out=torch.zeros(50, dtype=torch.uint8))


def test_bad_requests_fail_clearly():
    pool = PinnedBlockPool(256, device="cpu", block_bytes=64)
    with pytest.raises(ValueError, match="257 bytes asked of a host pool of 256"):
        pool.alloc(257)
    buffer = pool.alloc(10)
    with pytest.raises(ValueError, match="outside a buffer"):
        pool.write(buffer, bytes(11))
    with pytest.raises(ValueError, match="do not fit"):
        pool.to_host(torch.zeros(3, dtype=torch.float32), buffer)
    pool.free(buffer)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(buffer)
    with pytest.raises(ValueError, match="after free"):
        pool.read(buffer)


def test_a_buffer_in_flight_is_not_reused_until_its_copy_is_done():
    copier = QueuedCopier()
    pool = PinnedBlockPool(256, block_bytes=64, copier=copier)
    swapped_out = pool.alloc(256)
    source = torch.arange(64, dtype=torch.int32)  # 256 bytes
    transfer = pool.to_host(source, swapped_out)
    pool.free(swapped_out)  # dropped while the device->host copy is still queued
    assert not transfer.done() and pool.free_bytes == 256
    reused = pool.alloc(256)  # nothing else is free: must wait for the copy, not hand out live memory
    assert transfer.done()
    pool.write(reused, bytes(256))
    assert not copier.queue  # the queued copy ran before the new owner wrote, so it cannot clobber it
    assert pool.read(reused) == bytes(256)


def test_parked_blocks_stay_parked_while_other_blocks_are_free():
    copier = QueuedCopier()
    pool = PinnedBlockPool(512, block_bytes=64, copier=copier)
    first = pool.alloc(256)
    transfer = pool.to_host(torch.ones(64, dtype=torch.int32), first)
    pool.free(first)
    second = pool.alloc(256)
    assert not transfer.done(), "a free stretch was available: no need to wait"
    assert {start for start, _ in second.runs}.isdisjoint({start for start, _ in first.runs})


def test_host_access_waits_for_the_buffers_own_copy():
    copier = QueuedCopier()
    pool = PinnedBlockPool(256, block_bytes=64, copier=copier)
    buffer = pool.alloc(16)
    pool.to_host(torch.arange(4, dtype=torch.int32), buffer)
    assert pool.read(buffer) == torch.arange(4, dtype=torch.int32).numpy().tobytes()


def test_cpu_fallback_is_chosen_when_cuda_is_absent():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert isinstance(make_copier(None), CpuCopier)
    assert PinnedBlockPool(64).device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        PinnedBlockPool(64, device="cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        PinnedBlockPool(64, device="meta")


@cuda
def test_cuda_pool_is_pinned_and_copies_asynchronously():
    with PinnedBlockPool(8 << 20, device="cuda") as pool:
        assert pool.pinned and pool._arena.is_pinned() and pool._arena.numel() == 8 << 20
        source = torch.randn(1 << 20, device="cuda")
        buffer = pool.alloc(source.nbytes)
        pool.to_host(source, buffer)
        device, transfer = pool.to_device(buffer)
        pool.hand_over(device, transfer)  # the current stream waits on the GPU, not the host
        assert torch.equal(device.view(torch.float32), source)
        assert pool.bandwidth("h2d") is not None


@cuda
def test_cuda_device_to_host_copy_is_ordered_after_compute_work():
    with PinnedBlockPool(4 << 20, device="cuda") as pool:
        x = torch.zeros(1 << 20, device="cuda")
        for _ in range(20):
            x.add_(1)  # queued on the compute stream
        buffer = pool.alloc(x.nbytes)
        pool.to_host(x, buffer)
        values = torch.frombuffer(bytearray(pool.read(buffer)), dtype=torch.float32)
        assert torch.all(values == 20)
