"""Applying a LoRA adapter's tensors, where they already are, to a ``transformers`` model.

What PEFT's ``LoraModel`` computes for a plain LoRA on a linear layer, in
eval mode: ``y = W x + scaling * B (A x)`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``) and ``alpha_pattern``
overriding ``lora_alpha`` per module, matched as PEFT matches it. Here a
forward hook on each targeted linear layer adds the same term with the same
operations, reading ``A`` and ``B`` from the tensors ``LoraKVCache`` hands
out (on the device, in its pool): switching adapters between requests copies
nothing, where loading through PEFT would copy every weight into the model.

Supported: adapters saved by PEFT's ``save_pretrained`` whose LoRA targets
``nn.Linear`` layers (tensor names ``base_model.model.<module>.lora_A.weight``
and ``.lora_B.weight``). Refused with ``UnsupportedAdapter``: DoRA,
``fan_in_fan_out``, LoRA biases, ``modules_to_save`` and targets that are not
linear layers of the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class UnsupportedAdapter(ValueError):
    """An adapter this module cannot apply exactly as PEFT would."""


@dataclass(frozen=True)
class _Delta:
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def scaling_for(module: str, rank: int, config: Mapping) -> float:
    """PEFT's scaling of a module's LoRA term under ``config`` (an ``adapter_config.json``)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class LoraLayers:
    """Forward hooks on a model's linear layers that add the active adapter's LoRA term.

    ``activate(name, tensors, config)`` makes an adapter active until
    ``deactivate()``; one adapter at a time (requests run one after another).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._hooked: set[str] = set()
        self._active: dict[str, _Delta] = {}
        self.active_name: str | None = None

    def activate(self, name: str, tensors: Mapping[str, torch.Tensor], config: Mapping) -> None:
        """Apply adapter ``name``: ``tensors`` in PEFT's saved layout, ``config`` its adapter_config.json."""
        deltas = self._deltas(name, tensors, config)
        for module in deltas.keys() - self._hooked:
            self._linears[module].register_forward_hook(self._hook(module))
            self._hooked.add(module)
        self._active, self.active_name = deltas, name

    def deactivate(self) -> None:
        self._active, self.active_name = {}, None

    def _hook(self, module: str):
        def add_lora(_layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            delta = self._active.get(module)
            if delta is None:
                return None
            return output + F.linear(F.linear(inputs[0], delta.a), delta.b) * delta.scaling
        return add_lora

    def _deltas(self, name: str, tensors: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, _Delta]:
        for key, reason in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"), ("lora_bias", "LoRA biases"),
                            ("modules_to_save", "modules_to_save")):
            if config.get(key):
                raise UnsupportedAdapter(f"adapter {name!r} uses {reason}, which LoraLayers does not apply")
        if config.get("peft_type", "LORA") != "LORA":
            raise UnsupportedAdapter(f"adapter {name!r} is {config.get('peft_type')}, not LORA")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if not key.startswith(_PREFIX) or suffix is None:
                raise UnsupportedAdapter(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a linear layer")
            pairs.setdefault(key[len(_PREFIX):-len(suffix)], {})[suffix[1:7]] = tensor
        deltas = {}
        for module, pair in pairs.items():
            linear = self._linears.get(module)
            if linear is None:
                raise UnsupportedAdapter(f"adapter {name!r} targets {module!r}, which is not a linear layer of the model")
            a, b = pair.get("lora_A"), pair.get("lora_B")
            if a is None or b is None or a.shape != (a.shape[0], linear.in_features) or b.shape != (linear.out_features, a.shape[0]):
                raise UnsupportedAdapter(f"adapter {name!r}: {module} needs lora_A [r, {linear.in_features}] and "
                                         f"lora_B [{linear.out_features}, r]")
            # PEFT upcasts half-precision adapter weights to the model's dtype when it loads them; so does this
            # (a no-op, no copy, when the dtypes agree).
            dtype = linear.weight.dtype
            deltas[module] = _Delta(a.to(dtype), b.to(dtype), scaling_for(module, a.shape[0], config))
        return deltas
