"""A real (tiny) Llama and real PEFT adapters for the serving benchmark, made here: nothing is downloaded.

- ``ModelSpec.build()``: ``LlamaForCausalLM`` from a config, weights drawn
  from a seeded generator, float32, eval mode.
- ``write_adapters``: LoRA adapters made with PEFT's ``get_peft_model`` (ranks
  from ``RANKS``, on the attention projections, random non-zero weights from
  a seed per adapter, scaled to the size of a trained adapter's update; alpha
  16 or twice the rank, some with rsLoRA) and written with ``save_pretrained``:
  PEFT's folder layout, ``adapter_config.json`` and ``adapter_model.safetensors``.
- ``PeftReference``: the oracle. First-token logits of a full prefill of the
  prompt, without any cache, by a separate copy of the model with the
  adapter loaded by PEFT itself (``PeftModel.load_adapter``) from the folder
  ``write_adapters`` made.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT's random initialisation (init_lora_weights=False) makes updates several times the size of the base
# weights; trained adapters change a layer by a few percent of its norm. Each adapter's updates are scaled to
# a share drawn from this range.
DELTA_NORM = (0.02, 0.2)


@dataclass(frozen=True)
class ModelSpec:
    """A Llama configuration small enough for two CPU cores, deep enough that prefill grows with length."""

    vocab: int = 1024
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 4096
    seed: int = 0

    def build(self, device: str | torch.device = "cpu"):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
        return model.to(device=device, dtype=torch.float32).eval()


def adapter_name(index: int) -> str:
    return f"lora-{index:03d}"


def write_adapters(model, root: Path, count: int, seed: int = 0, ranks: Sequence[int] = RANKS) -> dict[str, int]:
    """``count`` adapters for ``model`` in ``root/<name>/``; returns each one's rank. ``model`` is left as it was."""
    from peft import LoraConfig, get_peft_model

    rng = np.random.default_rng(seed)
    chosen = {adapter_name(i): int(rng.choice(ranks)) for i in range(count)}
    base = copy.deepcopy(model)
    logging.getLogger("peft").setLevel(logging.ERROR)
    with torch.random.fork_rng(devices=[]):
        for i, (name, rank) in enumerate(chosen.items()):
            torch.manual_seed(seed * 100_003 + i)
            config = LoraConfig(r=rank, lora_alpha=2 * rank if i % 2 else 16, use_rslora=i % 3 == 2,
                                target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
            peft_model = get_peft_model(base, config)
            _shrink(peft_model, "default", float(rng.uniform(*DELTA_NORM)))
            peft_model.save_pretrained(str(root / name))
            base = peft_model.unload()
    return chosen


def _shrink(peft_model, adapter: str, share: float) -> None:
    """Scale each LoRA B so that the update ``scaling * B A`` is ``share`` of its base weight's norm."""
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and adapter in module.lora_B:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            delta = (b @ a).norm() * module.scaling[adapter]
            with torch.no_grad():
                b.mul_(share * module.get_base_layer().weight.norm() / delta)


def upload(fs, local_root: Path, remote_root: str) -> int:
    """Copy every adapter folder under ``local_root`` to ``remote_root`` on ``fs``; returns the bytes."""
    total = 0
    for path in sorted(local_root.rglob("*")):
        if path.is_file() and path.name != "README.md":
            data = path.read_bytes()
            fs.pipe_file(f"{remote_root}/{path.relative_to(local_root).as_posix()}", data)
            total += len(data)
    return total


class PeftReference:
    """Full-prefill first-token logits under an adapter loaded by PEFT, on a copy of ``model``."""

    def __init__(self, model, adapters_root: Path) -> None:
        self.base = copy.deepcopy(model).eval()
        self.root = Path(adapters_root)
        self.device = next(self.base.parameters()).device
        self.peft = None

    def logits(self, requests: Iterable[tuple[str, np.ndarray]]) -> list[torch.Tensor]:
        """Logits (float32, CPU) for each (adapter, prompt), computed adapter by adapter."""
        from peft import PeftModel

        requests = list(requests)
        logits: list[torch.Tensor | None] = [None] * len(requests)
        by_adapter: dict[str, list[int]] = {}
        for i, (adapter, _prompt) in enumerate(requests):
            by_adapter.setdefault(adapter, []).append(i)
        for adapter, indices in by_adapter.items():
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(self.root / adapter), adapter_name=adapter).eval()
            else:
                self.peft.load_adapter(str(self.root / adapter), adapter_name=adapter)
                self.peft.set_adapter(adapter)
            for i in indices:
                logits[i] = self.full_prefill(requests[i][1])
            if len(self.peft.peft_config) > 1:
                self.peft.delete_adapter(next(n for n in self.peft.peft_config if n != adapter))
        return logits

    def full_prefill(self, prompt: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=self.device).unsqueeze(0)
        with torch.no_grad():
            logits = self.peft(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            return logits.float().cpu()  # waits for the device
