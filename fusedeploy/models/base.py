"""What every architecture adapter knows, and the generic parts they share.

Everything outside `fusedeploy.models` asks an adapter instead of poking at
module paths, so a new family is one small subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The side array (compress/activations.py) holding a mini-batch's token ids, for blocks that read them.
SEQUENCE_IDS = "input_ids"
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Facts about one Hugging Face decoder family (one `config.model_type`)."""

    model_type: ClassVar[str]
    family: ClassVar[str]
    # -- which steps take the family, and how (read by compress and exporters/) ----------
    # {"compress" | "gguf" | "onnx": why that step cannot take this family}; absent: supported.
    unsupported: ClassVar[dict[str, str]] = {}
    # The architecture ONNX Runtime GenAI's builder must dispatch on, when it has no entry for the
    # checkpoint's own `architectures[0]` but builds the same graph under another name; None: the own.
    onnx_builder_architecture: ClassVar[str | None] = None
    # Class attributes set on llama.cpp's converter class before it runs (its command-line switches).
    gguf_converter_options: ClassVar[dict[str, object]] = {}

    def refusal(self, config, step: str) -> str | None:
        """Why `step` ("compress", "gguf", "onnx") cannot take this model, or None when it can."""
        return self.unsupported.get(step)

    def onnx_rope_inv_freq(self, config):
        """PyTorch's RoPE inverse frequencies where ONNX Runtime GenAI's builder computes others, else None.

        Builder 0.18 implements YaRN without truncating the correction range (GPT-OSS's
        `truncate: false`); transformers truncates it by default, so for such a config the
        builder's cos/sin tables are replaced by these frequencies (exporters/onnx_genai.py).
        """
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type") != "yarn" or rope.get("truncate", True) is False:
            return None
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")[0]

    def onnx_context_limit(self, config) -> int | None:
        """Tokens up to which the builder's graph computes what PyTorch does (None: the whole context)."""
        return None

    # -- GGUF facts llama.cpp's converter does not write itself (read by exporters/gguf.py) --
    def gguf_extra_metadata(self, config) -> dict:
        """Family-specific `<arch>.*` keys beyond the common ones: {key suffix: value}."""
        return {}

    # -- ONNX Runtime GenAI's builder ------------------------------------------
    def adapt_for_genai_builder(self, config) -> None:
        """Rewrite, in place, the builder's copy of the config into what the builder reads: its class name
        for this family's graph (`onnx_builder_architecture`), or an older layout of a field."""
        if self.onnx_builder_architecture:
            config.architectures = [self.onnx_builder_architecture]

    # -- attention shape and logits -----------------------------------------
    def head_dim(self, config) -> int:
        """Per-head width: an explicit `head_dim` (Qwen3, Gemma 3 set one) else hidden / heads."""
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def kv_heads(self, config) -> int:
        """Key/value heads (grouped-query attention); all heads when the config names none."""
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def logit_softcap(self, config) -> float | None:
        """The cap of `cap * tanh(logits / cap)` applied after the LM head, if the family has one."""
        return None

    def cap_logits(self, config, logits):
        cap = self.logit_softcap(config)
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self, model: nn.Module, hidden):
        """Next-token logits from the last block's output, exactly as the model's forward computes them."""
        return self.cap_logits(model.config, model.get_output_embeddings()(self.final_norm(model)(hidden)))

    # The block's last write to the residual stream: a linear whose output the block adds to its
    # residual unchanged, so a map can be folded into its weight (compress/repair_init.py). None
    # where a norm or another write follows it.
    residual_linear: ClassVar[str | None] = "mlp.down_proj"

    # Config attributes that hold one entry per block and must shrink with them.
    per_layer_config_lists: ClassVar[tuple[str, ...]] = ("layer_types",)

    # -- replaying one block at a time (compress/runner.py) -----------------------------
    # What a block's forward takes that depends on the sequences, not only on their length:
    # (positional arguments after the hidden states, keyword names). The runner leaves them out of
    # the kwargs it captures once; `run_block` supplies them per mini-batch.
    sequence_arguments: ClassVar[tuple[int, tuple[str, ...]]] = (0, ())

    def run_block(self, model: nn.Module, blocks: nn.ModuleList, index: int, hidden: torch.Tensor,
                  kwargs: dict, side: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Block `index` (current numbering) on a mini-batch, with its captured kwargs.

        `side` holds the mini-batch's per-sequence arrays (compress/activations.py); returns the
        block's output and the arrays that go on with it.
        """
        out = blocks[index](hidden, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), side

    def removal_refusal(self, config, remove) -> str | None:
        """Why removing these blocks (current indices) together is refused, or None: scoring and the
        searches never pick such a block or set."""
        return None

    # -- where things are -------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The bare decoder (embeddings, blocks, final norm) under the LM head."""
        return model.model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def linear_names(self, block: nn.Module | None = None) -> tuple[str, ...]:
        """Dotted names of a block's linear layers, relative to the block.

        Hybrid families (Qwen 3.5) have blocks of several kinds; given a block, the names in
        that block; without one, every name any block of the family has.
        """
        return tuple(f"self_attn.{n}" for n in ATTENTION_LINEARS) + tuple(
            f"mlp.{n}" for n in MLP_LINEARS
        )

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.linear_names(block)}

    # -- renumbering after block removal ---------------------------------
    def remove_blocks(self, model: nn.Module, remove: list[int] | set[int]) -> list[int]:
        """Drop blocks by current index and renumber the rest 0..N'-1.

        Returns the kept blocks' former indices. Afterwards the model, its
        attention layers and its config describe an ordinary N'-block model,
        so stock `save_pretrained`/`from_pretrained` round-trip it.
        """
        blocks = self.blocks(model)
        n = len(blocks)
        remove = set(remove)
        bad = [i for i in remove if not 0 <= i < n]
        if bad:
            raise IndexError(f"block indices {sorted(bad)} out of range for {n} blocks")
        kept = [i for i in range(n) if i not in remove]
        if not kept:
            raise ValueError("cannot remove every block")
        new_blocks = nn.ModuleList([blocks[i] for i in kept])
        self.decoder(model).layers = new_blocks
        for new_idx, block in enumerate(new_blocks):
            self.set_block_index(block, new_idx)
        self.update_config(model.config, kept, n)
        return kept

    def set_block_index(self, block: nn.Module, index: int) -> None:
        """Tell a block its new position (the KV cache is indexed by it)."""
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index

    def update_config(self, config, kept: list[int], old_count: int) -> None:
        config.num_hidden_layers = len(kept)
        for attr in self.per_layer_config_lists:
            values = getattr(config, attr, None)
            if isinstance(values, (list, tuple)) and len(values) == old_count:
                setattr(config, attr, [values[i] for i in kept])
