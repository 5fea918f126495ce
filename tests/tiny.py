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


def tiny_config(model_type: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    extra = {
        "llama": {},
        "mistral": {"sliding_window": None},
        "qwen2": {},
        "qwen3": {"head_dim": 16},
        "gemma3_text": {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16},
    }[model_type]
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
    return model.eval()


def save_tiny_model(model_type: str, tokenizer, folder: str | Path, seed: int = 0, **overrides) -> Path:
    folder = Path(folder)
    model = tiny_model(model_type, len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder
