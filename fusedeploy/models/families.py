"""One adapter per supported architecture family.

Llama, Mistral, Qwen2/3 and Gemma 3 share the Llama block layout, so most
adapters only name themselves; what differs between them lives here and
nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ArchitectureAdapter


@dataclass(frozen=True)
class LlamaAdapter(ArchitectureAdapter):
    """Llama 2/3 and SmolLM2 (which is a Llama)."""

    model_type = "llama"
    family = "Llama"


@dataclass(frozen=True)
class MistralAdapter(ArchitectureAdapter):
    model_type = "mistral"
    family = "Mistral"


@dataclass(frozen=True)
class Ministral3Adapter(ArchitectureAdapter):
    """Ministral 3 (dense, text; `Ministral3ForCausalLM`): a Llama block with YaRN RoPE and
    Llama 4's position-dependent query temperature (`rope_parameters.llama_4_scaling_beta`:
    queries scaled by `1 + beta * log(1 + floor(pos / original_max_position_embeddings))`).
    Nothing in it is per block, so block removal is the generic one."""

    model_type = "ministral3"
    family = "Ministral 3"
    # builder 0.18 names only the VLM (Mistral3ForConditionalGeneration, which loads the VLM class);
    # its MistralForCausalLM builder reads the text checkpoint's YaRN rope_parameters itself.
    onnx_builder_architecture = "MistralForCausalLM"

    def onnx_context_limit(self, config) -> int | None:
        """The builder leaves out Llama 4's query temperature, which is 1 below the original context."""
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("llama_4_scaling_beta") and rope.get("original_max_position_embeddings"):
            return int(rope["original_max_position_embeddings"])
        return None


@dataclass(frozen=True)
class _QwenWindowedAdapter(ArchitectureAdapter):
    """Qwen2/3: `max_window_layers` counts leading full-attention blocks."""

    def update_config(self, config, kept, old_count):
        limit = getattr(config, "max_window_layers", None)
        super().update_config(config, kept, old_count)
        if isinstance(limit, int):
            config.max_window_layers = sum(1 for i in kept if i < limit)


@dataclass(frozen=True)
class Qwen2Adapter(_QwenWindowedAdapter):
    """Qwen2 / Qwen2.5: biased q/k/v projections."""

    model_type = "qwen2"
    family = "Qwen2"


@dataclass(frozen=True)
class Qwen3Adapter(_QwenWindowedAdapter):
    """Qwen3 dense: per-head q/k norms inside attention."""

    model_type = "qwen3"
    family = "Qwen3"


@dataclass(frozen=True)
class Gemma3TextAdapter(ArchitectureAdapter):
    """Gemma 3 text models: interleaved sliding/full attention via `layer_types`."""

    model_type = "gemma3_text"
    family = "Gemma 3"

    def logit_softcap(self, config) -> float | None:
        return getattr(config, "final_logit_softcapping", None) or None

    def gguf_extra_metadata(self, config) -> dict:
        extra = {}
        if getattr(config, "sliding_window", None):
            extra["attention.sliding_window"] = int(config.sliding_window)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:  # per block, so a model with blocks removed keeps each block's attention kind
            extra["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        return extra
