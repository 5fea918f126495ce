"""Tiny randomly initialised models of each supported family, for fast structural tests.

They borrow a real tokenizer (so exporters and runtimes see a real vocabulary)
but have a few narrow blocks. Quality claims need a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusedeploy.models.loading import save_tokenizer

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
               tie_word_embeddings=False)


# Weights scaled so that activations have the size they have at the real width: a linear layer's
# output shrinks with sqrt(hidden) at the same init std, and Qwen 3.5's linear attention feeds its
# q/k/v through epsilon-guarded norms, where 64-wide activations sit near the epsilon that 4096-wide
# ones are far from (sqrt(4096 / 64) = 8).
_REAL_MAGNITUDE = {"qwen3_5_text": {"linear_attn.in_proj_qkv.weight": 8.0}}


def tiny_config(model_type: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    extra = {
        "llama": {},
        "mistral": {"sliding_window": None},
        "qwen2": {},
        "qwen3": {"head_dim": 16},
        "gemma3_text": {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16},
        # YaRN as Ministral 3 ships it, scaled down: a 64-token original context, so that Llama 4's
        # query temperature (floor(pos / 64)) acts inside a 100-token test sequence, and beta_fast 4
        # so that YaRN's correction range (dims 0.5..1.4 of 8) lies inside the tiny head as 20..37 of
        # 64 does in the real one
        "ministral3": {"head_dim": 16, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 64,
            "max_position_embeddings": 1024, "beta_fast": 4.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
            "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
        # full attention every 2nd block (the real one: every 4th), so that removing blocks 1 and 4
        # keeps both kinds; Gated DeltaNet heads scaled down like the rest; interleaved MRoPE on a
        # quarter of the head as the real config has it ([11, 11, 10] of 64 rotary dims there)
        "qwen3_5_text": {"head_dim": 32, "full_attention_interval": 2, "linear_key_head_dim": 16,
                         "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                             "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                             "mrope_interleaved": True}},
        # Gemma 4 E2B's text model scaled down: per-layer input embeddings (8 wide per block; 256 there),
        # sliding/full attention with wider full-attention heads and fewer KV heads (per_layer_config),
        # the last blocks reusing earlier blocks' K/V (2 of 6; 20 of 35 there). layer_types
        # [s, f, s, f, s, f] with blocks 4 and 5 sharing: blocks 2 and 3 store K/V, blocks 4 and 5 read it,
        # so removing blocks 1 and 4 is well defined (see the adapter)
        "gemma4_text": {"head_dim": 16, "global_head_dim": 32,
                        "sliding_window": 32, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 2,
                        "layer_types": ["sliding_attention", "full_attention"] * 3,
                        "rope_parameters": {
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0}}},
    }[model_type]
    if model_type == "gemma4_text":
        extra = {**extra, "vocab_size_per_layer_input": vocab_size}
    kwargs = {**_COMMON, **extra, "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, vocab_size: int, seed: int = 0, **overrides):
    """A random float32 model of the family; the seed makes it reproducible."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms, so a block that is skipped is visible in the output
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            for suffix, scale in _REAL_MAGNITUDE.get(model_type, {}).items():
                if name.endswith(suffix):
                    p.mul_(scale)
    return model.eval()


def save_tiny_model(model_type: str, tokenizer, folder: str | Path, seed: int = 0, **overrides) -> Path:
    folder = Path(folder)
    model = tiny_model(model_type, len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder
