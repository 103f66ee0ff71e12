"""igtcache.cuda: a pinned host block pool and host<->device copies on a dedicated stream, with a CPU fallback."""

from igtcache.cuda.copier import CpuCopier, CudaCopier, Transfer, make_copier
from igtcache.cuda.pinned_pool import HostBuffer, PinnedBlockPool, PoolFull

__all__ = ["CpuCopier", "CudaCopier", "HostBuffer", "PinnedBlockPool", "PoolFull", "Transfer", "make_copier"]
