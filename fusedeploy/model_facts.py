"""Model facts for `fusedeploy info`: what a user needs to size a deployment."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .models import adapter_for
from .models.loading import load_config, resolve_model


@dataclass
class ModelInfo:
    model: str
    architecture: str
    model_type: str
    blocks: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    parameters: int
    bytes_fp32: int
    bytes_fp16: int
    bytes_bf16: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_info(spec: str) -> ModelInfo:
    """Counts parameters from the config on the meta device: no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(spec)
    config = load_config(source)
    adapter = adapter_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    return ModelInfo(
        model=spec, architecture=adapter.family, model_type=config.model_type,
        blocks=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, attention_heads=config.num_attention_heads,
        kv_heads=adapter.kv_heads(config),
        vocab_size=config.vocab_size, parameters=params,
        bytes_fp32=params * 4, bytes_fp16=params * 2, bytes_bf16=params * 2,
    )
