"""One adapter per supported architecture family.

Llama, Mistral, Qwen2/3 and Gemma 3 share the Llama block layout, so most
adapters only name themselves; what differs between them lives here and
nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import ATTENTION_LINEARS, MLP_LINEARS, ArchitectureAdapter


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

    def adapt_for_genai_builder(self, config) -> None:
        """transformers 5 keeps RoPE per attention kind (`rope_parameters` = {"full_attention": {...},
        "sliding_attention": {...}}); ONNX Runtime GenAI 0.18's Gemma 3 builder reads the transformers 4
        layout: the full layers' parameters flat, the sliding layers' base as `rope_local_base_freq`."""
        super().adapt_for_genai_builder(config)
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


# Qwen 3.5's block kinds (`config.layer_types`) and the linears each kind's mixer has.
QWEN35_MIXER_LINEARS = {
    # Gated DeltaNet (linear attention): its conv1d, A_log, dt_bias and gated norm are not linears
    "linear_attention": tuple(f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                                             "in_proj_a", "out_proj")),
    # gated softmax attention: q_proj is twice as wide (query and output gate)
    "full_attention": tuple(f"self_attn.{n}" for n in ATTENTION_LINEARS),
}


@dataclass(frozen=True)
class Qwen35TextAdapter(ArchitectureAdapter):
    """Qwen 3.5 text (`Qwen3_5ForCausalLM`): a hybrid of Gated DeltaNet (linear attention) blocks
    and gated full-attention blocks, one kind per block in `layer_types` (shrunk by removal, so
    the cache transformers builds from the config has one layer of the right kind per block).

    Fusion grafts a removed block's MLP into every neighbour and its attention only into
    neighbours of the same kind (names and shapes match); see `attach_fusion`.
    """

    model_type = "qwen3_5_text"
    family = "Qwen 3.5"
    # the checkpoint's multi-token-prediction head (`mtp.*`) predicts from the last block's hidden
    # state; transformers drops it on load and it would not fit a model with blocks removed, so
    # llama.cpp's converter is told there is none
    gguf_converter_options = {"no_mtp": True}
    # builder 0.18 names only the VLM, Qwen3_5ForConditionalGeneration, whose text part it builds
    onnx_builder_architecture = "Qwen3_5ForConditionalGeneration"

    def block_kind(self, block: nn.Module) -> str:
        return "linear_attention" if hasattr(block, "linear_attn") else "full_attention"

    def linear_names(self, block: nn.Module | None = None) -> tuple[str, ...]:
        kinds = [self.block_kind(block)] if block is not None else list(QWEN35_MIXER_LINEARS)
        mixers = tuple(n for kind in kinds for n in QWEN35_MIXER_LINEARS[kind])
        return mixers + tuple(f"mlp.{n}" for n in MLP_LINEARS)
