"""One adapter per supported architecture family.

Llama, Mistral, Qwen2/3 and Gemma 3 share the Llama block layout, so most
adapters only name themselves; what differs between them lives here and
nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ATTENTION_LINEARS, MLP_LINEARS, SEQUENCE_IDS, ArchitectureAdapter

# Gemma 4's per-layer inputs of a mini-batch, kept with it through one run of blocks but never stored:
# a side array whose name starts with "~" is not written (compress/activations.py), as it would be
# blocks x D wide per token (35 x 256 in E2B, several times the hidden states)
PER_LAYER_INPUTS = "~per_layer_inputs"


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
    residual_linear = None  # the MLP's output passes post_feedforward_layernorm before the residual

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


@dataclass(frozen=True)
class Gemma4TextAdapter(ArchitectureAdapter):
    """Gemma 4 text (`Gemma4ForCausalLM`, `gemma4_text`). Block removal keeps four per-block things consistent:

    - per-layer input embeddings: `embed_tokens_per_layer` (columns) and `per_layer_model_projection` (rows)
      hold one `hidden_size_per_layer_input` slice per block; the removed blocks' slices are dropped
      (`per_layer_projection_norm` acts on one slice and is shared by all blocks, so it stays);
    - `layer_types` (sliding/full attention) shrinks, and the last block must stay full attention
      (transformers forces that on load, which would change the kept block);
    - `per_layer_config` (the full-attention blocks' head_dim, keyed by block index) is renumbered;
    - KV sharing (`num_kv_shared_layers`): the last N blocks read the K/V that the last earlier block of
      their attention kind stores. Removing a reader lowers N by one; removing a storing block is refused
      (a reader would silently read another block's K/V). The decoder's cached
      `first_kv_shared_layer_idx`, `unique_layer_types` and load-ignore list follow.

    Compression replays one block at a time (compress/runner.py). Two arguments of a block depend on the
    sequences and are supplied by `run_block` per mini-batch instead of being captured once: the block's
    per-layer input (its slice, computed from the token ids the activations carry) and the shared K/V
    states (what the storing blocks wrote, carried with the activations until the last block that reads
    them). Blocks that cannot be removed (`removal_refusal`) are never candidates. GGUF and ONNX export
    are refused (`unsupported`).
    """

    model_type = "gemma4_text"
    family = "Gemma 4"
    residual_linear = None  # a post-feedforward norm, then the per-layer input's own write, follow the MLP
    unsupported = {
        # measured with llama-cpp-python 0.3.36 on tiny random models (docs/support.md, Gemma 4 notes)
        "gguf": "not supported yet: llama.cpp's converter writes Gemma4ForCausalLM and llama.cpp 0.3.36 loads it, but "
                "its f32 logits differ from PyTorch's by 0.4-1.4% relative (above the 1e-3 FuseDeploy accepts) even "
                "with no block removed, no per-layer inputs and no K/V sharing, and the cause is not found",
        # onnxruntime_genai/models/builder.py 0.18: Gemma4ForConditionalGeneration -> Gemma4MoEModel,
        # Gemma4UnifiedForConditionalGeneration -> Gemma4Model; builders/gemma.py has no per-layer inputs
        "onnx": "not supported: ONNX Runtime GenAI 0.18's builder knows Gemma 4 only as its VLM classes, whose text "
                "graphs have neither per-layer input embeddings nor K/V shared between blocks, so it would build "
                "another function",
    }

    def refusal(self, config, step: str) -> str | None:
        """The MoE variant (`enable_moe_block`) is refused for compress, as Mistral 4 is: expert e of one block
        is not expert e of another, so a removed block's routed experts have nothing to fuse into."""
        if step == "compress" and getattr(config, "enable_moe_block", False):
            return ("not supported: its blocks carry routed experts (enable_moe_block), and a removed block's experts "
                    "have no same-named neighbour to fuse into, so fusion is not defined for them")
        return super().refusal(config, step)

    def logit_softcap(self, config) -> float | None:
        return getattr(config, "final_logit_softcapping", None) or None

    def head_dim(self, config) -> int:
        """The global (sliding-attention) head_dim; full-attention blocks have their own in per_layer_config."""
        get = getattr(config, "_getattr_without_heterogeneous_validation", None)
        return int(get("head_dim") if get else config.head_dim)

    def linear_names(self, block: nn.Module | None = None) -> tuple[str, ...]:
        """Blocks that reuse K/V have no k/v projections; with `attention_k_eq_v` full blocks have no v_proj.
        Every block has its per-layer input gate and projection."""
        attn = [f"self_attn.{n}" for n in ATTENTION_LINEARS]
        if block is not None:
            attn = [n for n in attn if _submodule(block, n) is not None]  # (also once wrapped for fusion)
        return tuple(attn) + tuple(f"mlp.{n}" for n in MLP_LINEARS) + (
            "per_layer_input_gate", "per_layer_projection")

    # the per-layer input (second positional argument) and the dict the storing blocks write K/V into
    sequence_arguments = (1, ("per_layer_input", "shared_kv_states"))

    def run_block(self, model, blocks, index, hidden, kwargs, side):
        """Replays the whole forward's call: the block's own per-layer input slice, and a K/V dict that
        holds what earlier blocks stored (from `side`); what this block stores goes on in `side` as long
        as a later block reads it."""
        from transformers.cache_utils import KVSharingDict

        per_layer_input, after = None, {k: v for k, v in side.items() if not k.startswith(("k:", "v:"))}
        if model.config.hidden_size_per_layer_input:
            every = side.get(PER_LAYER_INPUTS)  # computed by the first block of this mini-batch's run
            if every is None:
                if SEQUENCE_IDS not in side:
                    raise RuntimeError("Gemma 4 blocks need the token ids with the activations (per-layer inputs)")
                every = after[PER_LAYER_INPUTS] = self.per_layer_inputs(model, side[SEQUENCE_IDS]).to(hidden.device)
            per_layer_input = every[:, :, index]
        shared = KVSharingDict({name[2:]: (side[name], side["v:" + name[2:]])
                                for name in side if name.startswith("k:")})
        out = blocks[index](hidden, per_layer_input, shared_kv_states=shared, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        read_later = {b.self_attn.layer_type for b in blocks[index + 1:] if b.self_attn.is_kv_shared_layer}
        for kind, (k, v) in shared.items():
            if kind in read_later:
                after["k:" + kind], after["v:" + kind] = k, v
        return out, after

    def per_layer_inputs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Every current block's per-layer input [b, T, blocks, D], by the decoder's own code (computing one
        block's slice alone rounds differently); the tables hold one slice per current block."""
        dec = self.decoder(model)
        ids = ids.to(dec.embed_tokens.weight.device)
        embeds = dec.embed_tokens(ids)
        return dec.project_per_layer_inputs(embeds, dec.get_per_layer_inputs(ids, embeds))

    def removal_refusal(self, config, remove) -> str | None:
        """Why removing these blocks (current indices) together is refused, or None."""
        from ..errors import UserError

        try:
            self.check_removal(config, set(remove))
        except UserError as err:
            return str(err)
        return None

    def check_removal(self, config, remove: set[int]) -> None:
        from ..errors import UserError

        n = config.num_hidden_layers
        kept = [i for i in range(n) if i not in remove]
        modes = config.kv_sharing_modes
        stores = sorted(i for i in remove if 0 <= i < n and modes[i] == "store")
        if stores:
            readers = [i for i in range(n) if modes[i] == "reuse" and i not in remove
                       and config.layer_types[i] in {config.layer_types[s] for s in stores}]
            raise UserError(f"cannot remove Gemma 4 block(s) {stores}: they store the K/V that block(s) {readers} "
                            f"read (num_kv_shared_layers={config.num_kv_shared_layers}); remove readers or "
                            f"earlier blocks instead")
        if kept and config.layer_types[kept[-1]] != "full_attention":
            raise UserError(f"cannot remove Gemma 4 block(s) {sorted(remove)}: the last kept block ({kept[-1]}) would "
                            f"be {config.layer_types[kept[-1]]}, and transformers makes a Gemma 4's last block full "
                            f"attention")

    def remove_blocks(self, model: nn.Module, remove) -> list[int]:
        remove = set(remove)
        if all(0 <= i < len(self.blocks(model)) for i in remove) and len(remove) < len(self.blocks(model)):
            self.check_removal(model.config, remove)
        kept = super().remove_blocks(model, remove)
        decoder = self.decoder(model)
        width = model.config.hidden_size_per_layer_input
        if width:
            cols = torch.cat([torch.arange(i * width, (i + 1) * width) for i in kept])
            table, proj = decoder.embed_tokens_per_layer, decoder.per_layer_model_projection
            table.weight = nn.Parameter(table.weight.data[:, cols].clone(), requires_grad=table.weight.requires_grad)
            table.embedding_dim = len(cols)
            proj.weight = nn.Parameter(proj.weight.data[cols].clone(), requires_grad=proj.weight.requires_grad)
            proj.out_features = len(cols)
        decoder.first_kv_shared_layer_idx = model.config.num_hidden_layers - model.config.num_kv_shared_layers
        decoder.unique_layer_types = set(model.config.layer_types)
        decoder._keys_to_ignore_on_load_unexpected = [
            f"layers.{i}.self_attn.{name}" for i, b in enumerate(self.blocks(model)) if b.self_attn.is_kv_shared_layer
            for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
        return kept

    def update_config(self, config, kept, old_count):
        overrides = {}
        if getattr(config, "is_heterogeneous", False):
            overrides = config._heterogeneity_spec.per_layer_overrides
        first_shared = old_count - config.num_kv_shared_layers
        super().update_config(config, kept, old_count)
        config.num_kv_shared_layers = sum(1 for i in kept if i >= first_shared)
        # re-registered under the new block numbers (a view object: it is assigned, not edited)
        renumbered = {new: dict(overrides[old]) for new, old in enumerate(kept) if overrides.get(old)}
        config.per_layer_config = renumbered or None


def _submodule(block: nn.Module, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None
