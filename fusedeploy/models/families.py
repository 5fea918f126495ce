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

    def adapt_for_genai_builder(self, config) -> None:
        """transformers 5 keeps RoPE per attention kind (`rope_parameters` = {"full_attention": {...},
        "sliding_attention": {...}}); ONNX Runtime GenAI 0.18's Gemma 3 builder reads the transformers 4
        layout: the full layers' parameters flat, the sliding layers' base as `rope_local_base_freq`."""
        rope = getattr(config, "rope_parameters", None) or {}
        if "full_attention" in rope and "sliding_attention" in rope:
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])

    def gguf_extra_metadata(self, config) -> dict:
        extra = {}
        if getattr(config, "sliding_window", None):
            extra["attention.sliding_window"] = int(config.sliding_window)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:  # per block, so a model with blocks removed keeps each block's attention kind
            extra["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        return extra
