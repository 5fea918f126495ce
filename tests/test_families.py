"""The 2026 families' quirks, each checked where it matters: PyTorch, llama.cpp and ONNX Runtime GenAI.

The generic checks (block removal round trip, compress, f32 GGUF and ONNX
parity with blocks removed) run for every family through the FAMILIES /
TINY_TYPES lists of the other test files; here is what is particular to one
family, at the brief's tolerance (relative logit error <= 1e-3 in f32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.gguf import export_gguf
from exporters.onnx import export_onnx
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.errors import UserError
from fusedeploy.evaluate import LlamaCppBackend, OnnxRuntimeBackend, TorchBackend
from fusedeploy.models import ADAPTERS
from fusedeploy.models.loading import resolve_model

from .tiny import tiny_config, tiny_model

REL = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).location)


@pytest.fixture(scope="module")
def ids(tokenizer):
    text = Path("/work/shared/data/wikitext-2/test.txt")
    text = text.read_text(encoding="utf-8")[:3000] if text.is_file() else "The tower is 324 metres tall. " * 40
    return tokenizer(text, add_special_tokens=False)["input_ids"][:100]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def sharpen(model, scale: float = 4.0):
    """Sharper attention than random weights give, so that positions (RoPE, temperatures) move the logits."""
    with torch.no_grad():
        for block in model.model.layers:
            for name in ("q_proj", "k_proj"):
                if hasattr(block.self_attn, name):
                    getattr(block.self_attn, name).weight.mul_(scale)
    return model


def save(model, tokenizer, folder: Path, remove=()) -> Path:
    if remove:
        ADAPTERS[model.config.model_type].remove_blocks(model, list(remove))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gguf_logits(path: Path, ids) -> np.ndarray:
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        return backend.logits(ids)
    finally:
        backend.close()


# ---------------------------------------------------------------- Ministral 3


def test_ministral3_gguf_keeps_yarn_and_query_temperature(tokenizer, ids, tmp_path):
    """100 tokens past a 64-token original context: YaRN and Llama 4's query temperature both act."""
    import gguf

    model = sharpen(tiny_model("ministral3", len(tokenizer)))
    save(model, tokenizer, tmp_path / "hf", remove=(1, 3))
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "mistral3"
    assert reader.get_field("mistral3.attention.temperature_scale").contents() == pytest.approx(0.1)
    assert reader.get_field("mistral3.block_count").contents() == 4
    assert reader.get_field("fusedeploy.export_type").contents() == "f32"  # our keys reach the delegate converter
    want = TorchBackend(model).logits(ids)
    assert rel_err(gguf_logits(path, ids), want) <= REL
    # without the temperature the logits past position 64 differ: matching PyTorch above means it is applied
    cool = sharpen(tiny_model("ministral3", len(tokenizer)))
    cool.config.rope_parameters["llama_4_scaling_beta"] = 0.0
    ADAPTERS["ministral3"].remove_blocks(cool, [1, 3])
    assert rel_err(TorchBackend(cool).logits(ids), want) > 0.01


def test_ministral3_onnx_gets_pytorch_yarn_tables_and_a_faithful_context(tokenizer, ids, tmp_path):
    """The builder's YaRN does not truncate the correction range; ours replaces its tables with PyTorch's."""
    model = tiny_model("ministral3", len(tokenizer))
    save(model, tokenizer, tmp_path / "hf", remove=(1, 3))
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 4
    # past the original context the builder's graph lacks Llama 4's query temperature: not offered
    assert config["model"]["context_length"] == 64 == config["search"]["max_length"]
    backend = OnnxRuntimeBackend(out)
    got = backend.logits(ids[:60])
    want = TorchBackend(model).logits(ids[:60])
    assert rel_err(got, want) <= 1e-5
    # the untruncated YaRN the builder would have used gives other logits
    untruncated = tiny_model("ministral3", len(tokenizer), rope_parameters={
        **tiny_config("ministral3", 8).rope_parameters, "truncate": False})
    ADAPTERS["ministral3"].remove_blocks(untruncated, [1, 3])
    assert rel_err(TorchBackend(untruncated).logits(ids[:60]), want) > 1e-4
