"""Architecture adapters and model loading.

Modules: `base` (what every adapter knows: where the blocks and linears are,
renumbering after block removal, head_dim, logits and soft-cap), `families`
(one small adapter per supported family, with its quirks) and `loading`
(resolving --model to weights and loading them). Code elsewhere asks
`adapter_for(config)` instead of reading module paths or config quirks.
"""

from __future__ import annotations

from ..errors import UserError
from .base import ArchitectureAdapter
from .families import (
    Gemma3TextAdapter,
    LlamaAdapter,
    Ministral3Adapter,
    Qwen35TextAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    a.model_type: a
    for a in (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter(), Gemma3TextAdapter(),
              Ministral3Adapter(), Qwen35TextAdapter())
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config_or_model) -> ArchitectureAdapter:
    """The adapter for a config (or a model carrying one); a UserError otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        ) from None


__all__ = ["ADAPTERS", "ArchitectureAdapter", "adapter_for", "supported_architectures"]
