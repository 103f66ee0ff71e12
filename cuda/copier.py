"""Host<->device copies: on a dedicated CUDA stream ordered by events, or synchronous on CPU.

Both copiers have one API so that everything above them runs, and is tested,
on a machine without a GPU.

CUDA ordering rules (``CudaCopier``):

- Every copy runs on the copier's own stream, never on the compute stream.
- A copy touching device memory of the compute stream (the source of a
  device->host copy, a caller's ``out`` tensor) first waits, on the GPU and not
  the host, for the work already queued there, which may still use that
  memory. The tensor is then recorded on the copy stream, so the caching
  allocator cannot hand its memory to anyone before the copy is done with it.
- A host->device copy into memory the copier allocated itself (on the copy
  stream) needs neither: the allocator orders its reuse after the copy.
- A consumer gets a device tensor through ``hand_over``: its stream waits for
  the copy's end event (again on the GPU), and the tensor is recorded on that
  stream, so that freeing it later cannot let a new copy overwrite it while
  compute work still reads it.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

log = logging.getLogger(__name__)


class Transfer:
    """A copy that has been issued. A CPU copy is complete when it is returned."""

    def __init__(self, nbytes: int, seconds: float) -> None:
        self.nbytes = nbytes
        self._seconds = seconds

    def done(self) -> bool:
        """Whether the copy has finished (never blocks)."""
        return True

    def synchronize(self) -> None:
        """Block the calling thread until the copy has finished."""

    def wait(self) -> None:
        """Make the current stream wait for the copy (on the GPU; the host does not block)."""

    def seconds(self) -> float | None:
        """How long the copy took, once it is done; ``None`` before."""
        return self._seconds


class CudaTransfer(Transfer):
    """A copy on a CUDA stream, bracketed by two timing events."""

    def __init__(self, nbytes: int, start: torch.cuda.Event, end: torch.cuda.Event, device: torch.device) -> None:
        super().__init__(nbytes, 0.0)
        self._start, self._end, self._device = start, end, device

    def done(self) -> bool:
        return self._end.query()

    def synchronize(self) -> None:
        self._end.synchronize()

    def wait(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._end)

    def seconds(self) -> float | None:
        if not self.done():
            return None
        return self._start.elapsed_time(self._end) / 1e3


class CpuCopier:
    """Plain host memory and synchronous copies; the "device" is the CPU."""

    device = torch.device("cpu")
    pinned = False

    def host_memory(self, nbytes: int) -> torch.Tensor:
        """A host byte buffer of exactly ``nbytes``."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def release_host_memory(self, buffer: torch.Tensor) -> None:
        """Undo ``host_memory``'s registration (nothing to undo here)."""

    def device_empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised byte tensor on the device."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, to_device: bool, after_compute: bool) -> Transfer:
        """Copy each ``(dst, src)`` pair of byte tensors; ``to_device`` tells the direction.

        ``after_compute``: the device tensors belong to the compute stream (its
        work may still use them), so the copy must be ordered after that work.
        """
        started = time.perf_counter()
        for dst, src in pairs:
            dst.copy_(src)
        return Transfer(sum(src.numel() for _, src in pairs), time.perf_counter() - started)

    def hand_over(self, tensor: torch.Tensor, transfer: Transfer | None) -> None:
        """Make a device tensor safe to use on the current stream (nothing to order on CPU)."""


class CudaCopier:
    """Pinned host memory and asynchronous copies on a dedicated CUDA stream."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._finalizers: dict[int, weakref.finalize] = {}

    def host_memory(self, nbytes: int) -> torch.Tensor:
        # torch's pinned allocator rounds a block up to a power of two; registering
        # an ordinary buffer pins exactly the bytes asked for.
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return buffer
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if error == 0:
            self._finalizers[buffer.data_ptr()] = weakref.finalize(buffer, _unregister, buffer.data_ptr())
            return buffer
        log.warning("cudaHostRegister of %d bytes failed (cudaError %d); using torch's pinned allocator", nbytes, error)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def release_host_memory(self, buffer: torch.Tensor) -> None:
        finalizer = self._finalizers.pop(buffer.data_ptr(), None)
        if finalizer is not None:
            self.stream.synchronize()  # no copy may touch the memory once it is unregistered
            finalizer()

    def device_empty(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, to_device: bool, after_compute: bool) -> Transfer:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if after_compute:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            start.record()
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record()
        if after_compute:
            for dst, src in pairs:
                (dst if to_device else src).record_stream(self.stream)
        return CudaTransfer(sum(src.numel() for _, src in pairs), start, end, self.device)

    def hand_over(self, tensor: torch.Tensor, transfer: Transfer | None) -> None:
        if transfer is not None and not transfer.done():
            transfer.wait()
        tensor.record_stream(torch.cuda.current_stream(self.device))


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


def make_copier(device: str | torch.device | None) -> CpuCopier | CudaCopier:
    """The copier for ``device``: ``None`` picks CUDA when it is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return CpuCopier()
    if device.type != "cuda":
        raise ValueError(f"unsupported device {device}; use 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for but CUDA is not available here; use device='cpu'")
    return CudaCopier(device)
