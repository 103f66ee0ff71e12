"""The dependency tree: root -> adapters -> per-adapter prefix trees of KV blocks.

A KV block is keyed by the hash chain of its tokens (``chain_hashes``), so a
node stands for the whole prefix up to and including its block, under one
adapter only. Each node records where its bytes are: ``dev`` (a copy on the
device, in HBM) and ``host`` (a copy in the host pool); a node may have both.

The tree enforces the placement invariants when a copy is added or removed:

- a KV block has a device copy only if its parent (block or adapter) has one,
  so a block is in HBM only if its adapter is;
- a device copy is removed only from a device leaf (no child on the device)
  that nobody holds, so eviction happens at leaves and blocks in use stay;
- a KV block exists only while it has a copy somewhere, and one is removed
  only with its whole subtree; an adapter node outlives its copies (its bytes
  can always be read from the source again).

Swap-in therefore starts at the roots of host-resident subtrees, one level at
a time. ``violations`` re-checks all of this from scratch (for tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from igtcache.cuda import HostBuffer, Transfer


def chain_hashes(token_ids: Sequence[int], block_tokens: int, seed: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of ``token_ids``: ``h[i] = H(h[i-1] || tokens of block i)``, ``h[-1] = seed``
    (the model's identity: KV computed by one base model never matches another's)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError("token_ids must be a flat sequence of integers")
    keys, previous = [], seed
    for i in range(len(tokens) // block_tokens):
        previous = hashlib.blake2b(previous + tokens[i * block_tokens:(i + 1) * block_tokens].tobytes(),
                                   digest_size=16).digest()
        keys.append(previous)
    return keys


@dataclass(eq=False, kw_only=True)
class Node:
    """An adapter or a KV block, with its copies, its holders and its usage record."""

    parent: Node | None = None
    nbytes: int = 0
    children: dict[bytes, KVNode] = field(default_factory=dict, repr=False)
    dev: torch.Tensor | None = field(default=None, repr=False)  # flat uint8 copy on the device
    host: HostBuffer | None = field(default=None, repr=False)   # copy in the host pool
    ready: Transfer | None = field(default=None, repr=False)    # host->device copy into ``dev``, maybe in flight
    refs: int = 0                                                # holders; a held node stays on the device
    dev_children: int = 0
    uses: float = 0.0       # decayed use count, as of ``used_at`` (cost model)
    used_at: float = 0.0


@dataclass(eq=False, kw_only=True)
class TensorSlot:
    """Where one adapter tensor sits in the adapter's packed bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(eq=False, kw_only=True)
class AdapterNode(Node):
    name: str
    config: dict = field(default_factory=dict)
    slots: list[TensorSlot] = field(default_factory=list)


@dataclass(eq=False, kw_only=True)
class KVNode(Node):
    key: bytes
    adapter: AdapterNode
    dtype: torch.dtype
    shape: tuple[int, ...]


class DependencyTree:
    """The tree and its placement bookkeeping (no copies are made here)."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterNode] = {}
        self.on_device: set[Node] = set()
        self.on_host: set[Node] = set()
        self.device_bytes = 0
        self.host_bytes = 0

    # ------------------------------------------------------------------ structure

    def walk(self, adapter: AdapterNode, keys: Sequence[bytes]) -> list[KVNode]:
        """The longest chain of cached blocks under ``adapter`` along ``keys``."""
        path, node = [], adapter
        for key in keys:
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def add_kv(self, parent: Node, key: bytes, *, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> KVNode:
        """A new block below ``parent``; the caller gives it a copy at once."""
        adapter = parent if isinstance(parent, AdapterNode) else parent.adapter
        node = KVNode(parent=parent, key=key, adapter=adapter, nbytes=nbytes, dtype=dtype, shape=shape)
        parent.children[key] = node
        return node

    def remove_subtree(self, node: KVNode) -> tuple[int, list[HostBuffer]]:
        """Forget a block and everything below it (none may be on the device).

        Returns how many blocks went and the host buffers to free.
        """
        buffers, stack, removed = [], [node], 0
        while stack:
            current = stack.pop()
            if current.dev is not None:
                raise RuntimeError("a block on the device cannot be dropped with its subtree")
            stack.extend(current.children.values())
            removed += 1
            if current.host is not None:
                buffers.append(self.clear_host(current))
        del node.parent.children[node.key]
        return removed, buffers

    # ------------------------------------------------------------------ copies

    def set_device(self, node: Node, tensor: torch.Tensor, ready: Transfer | None = None) -> None:
        if node.dev is not None:
            raise RuntimeError("node already on the device")
        if isinstance(node, KVNode) and node.parent.dev is None:
            raise RuntimeError("a KV block may enter the device only after its parent")
        node.dev, node.ready = tensor, ready
        if node.parent is not None:
            node.parent.dev_children += 1
        self.on_device.add(node)
        self.device_bytes += node.nbytes

    def clear_device(self, node: Node) -> None:
        if node.dev is None:
            raise RuntimeError("node not on the device")
        if node.dev_children or node.refs:
            raise RuntimeError("only an unheld device leaf may leave the device")
        node.dev, node.ready = None, None
        if node.parent is not None:
            node.parent.dev_children -= 1
        self.on_device.discard(node)
        self.device_bytes -= node.nbytes

    def set_host(self, node: Node, buffer: HostBuffer) -> None:
        if node.host is not None:
            raise RuntimeError("node already in the host pool")
        node.host = buffer
        self.on_host.add(node)
        self.host_bytes += node.nbytes

    def clear_host(self, node: Node) -> HostBuffer:
        buffer, node.host = node.host, None
        self.on_host.discard(node)
        self.host_bytes -= node.nbytes
        return buffer

    # ------------------------------------------------------------------ candidates

    def device_leaves(self) -> Iterator[Node]:
        """Device copies that may leave now: unheld, with no child on the device."""
        return (n for n in self.on_device if not n.refs and not n.dev_children)

    def host_roots(self) -> Iterator[Node]:
        """Host-only nodes whose parent is on the device: where a swap-in may start."""
        return (n for n in self.on_host if n.dev is None and (n.parent is None or n.parent.dev is not None))

    def kv_bytes_without_adapter(self) -> int:
        """Device bytes of KV blocks whose adapter is not on the device (0 while the invariants hold)."""
        return sum(n.nbytes for n in self.on_device if isinstance(n, KVNode) and n.adapter.dev is None)

    def nodes(self) -> Iterator[Node]:
        stack: list[Node] = list(self.adapters.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def violations(self) -> list[str]:
        """Every broken invariant, checked from scratch."""
        problems, seen = [], set()
        device_bytes = host_bytes = 0
        for node in self.nodes():
            label = getattr(node, "name", None) or f"block {node.key.hex()[:8]} of {node.adapter.name}"
            if id(node) in seen:
                problems.append(f"{label} reachable twice")
            seen.add(id(node))
            on_device_children = sum(c.dev is not None for c in node.children.values())
            if on_device_children != node.dev_children:
                problems.append(f"{label}: dev_children {node.dev_children} != {on_device_children}")
            for key, child in node.children.items():
                if child.parent is not node or child.key != key:
                    problems.append(f"{label}: child linked wrongly")
                if child.adapter is not (node if isinstance(node, AdapterNode) else node.adapter):
                    problems.append(f"{label}: a child belongs to another adapter")
            if isinstance(node, KVNode):
                if node.dev is not None and node.parent.dev is None:
                    problems.append(f"{label} on the device without its parent")
                if node.dev is None and node.host is None:
                    problems.append(f"{label} has no copy")
            if node.refs and node.dev is None:
                problems.append(f"{label} held but not on the device")
            if (node in self.on_device) != (node.dev is not None) or (node in self.on_host) != (node.host is not None):
                problems.append(f"{label}: placement sets out of date")
            device_bytes += node.nbytes if node.dev is not None else 0
            host_bytes += node.nbytes if node.host is not None else 0
        if len(self.on_device) + len(self.on_host) != sum(n.dev is not None for n in self.nodes()) + sum(
                n.host is not None for n in self.nodes()):
            problems.append("placement sets hold nodes outside the tree")
        if (device_bytes, host_bytes) != (self.device_bytes, self.host_bytes):
            problems.append(f"byte counts {(self.device_bytes, self.host_bytes)} != {(device_bytes, host_bytes)}")
        return problems
