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
    Gemma4TextAdapter,
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
              Ministral3Adapter(), Qwen35TextAdapter(), Gemma4TextAdapter())
}


# Families FuseDeploy knows and declines, with why: one `error:` line (exit 2) instead of a wrong model.
REFUSED: dict[str, str] = {
    # MoE blocks (routed experts stacked in 3-D parameters, a router per block) with multi-head latent
    # attention (low-rank q/kv factor pairs with a norm between them). FuseGPT grafts a removed block's
    # linears into the same-named linears of its neighbours; expert e of one block is not expert e of
    # another (each router sends other tokens to it), and a sum of latent factor products is not a
    # product of summed factors, so neither the fusion nor its fold into dense weights is defined.
    "mistral4": "Mistral 4 (MoE with latent attention) cannot be compressed by block fusion: its routed "
                "experts and low-rank latent attention factors have no same-named neighbour to graft into, "
                "so fusion and the fold into dense weights are not defined",
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config_or_model) -> ArchitectureAdapter:
    """The adapter for a config (or a model carrying one); a UserError otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UserError(f"unsupported architecture {model_type!r}: {REFUSED[model_type]}")
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        ) from None


__all__ = ["ADAPTERS", "REFUSED", "ArchitectureAdapter", "adapter_for", "supported_architectures"]
