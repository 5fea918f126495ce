"""ONNX export in the real ONNX Runtime, no mocks: KV cache, fp32 parity, greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx import export_onnx
from fusedeploy.errors import UserError
from fusedeploy.evaluate import OnnxRuntimeBackend, TorchBackend
from fusedeploy.models import ADAPTERS
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.models.loading import resolve_model

from .tiny import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).location)


@pytest.fixture(scope="module")
def sample_ids(tokenizer):
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 3
    return tokenizer(text, add_special_tokens=False)["input_ids"][:60]


def torch_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=[(mt, rm) for mt in FAMILIES for rm in ((),)] + [("llama", (1, 3))],
                ids=lambda p: f"{p[0]}{'-removed' if p[1] else ''}")
def tiny_onnx(request, tokenizer, tmp_path_factory):
    mt, remove = request.param
    folder = tmp_path_factory.mktemp(f"onnx-{mt}")
    model = tiny_model(mt, len(tokenizer))
    if remove:
        ADAPTERS[mt].remove_blocks(model, list(remove))
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    out = export_onnx(folder / "hf", folder / "onnx")
    return model, out, 6 - len(remove)


def test_tiny_fp32_logits_and_cached_generation(tiny_onnx, sample_ids):
    model, out, blocks = tiny_onnx
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert sum(name.startswith("past_key_values.") for name in inputs) == 2 * blocks
    assert any(o.name.startswith("present.") for o in graph.output)
    backend = OnnxRuntimeBackend(out)
    got = backend.logits(sample_ids)
    want = TorchBackend(model).logits(sample_ids)
    assert np.abs(got - want).max() < 1e-4
    assert backend.generate(sample_ids[:20], 12) == torch_greedy(model, sample_ids[:20], 12)


@pytest.fixture(scope="module")
def tiny_llama_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama") / "hf"
    tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "compression.json").write_text(json.dumps(
        {"method": "plain-removal", "removed_blocks": [4, 5], "settings": {"k": 2}}))
    return folder


@pytest.mark.parametrize("mode,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_variants_run_with_provenance(mode, op, tiny_llama_dir, sample_ids, tmp_path):
    out = export_onnx(tiny_llama_dir, tmp_path / mode, quantize=mode)
    model = onnx.load(str(out / "model.onnx"))
    assert op in {n.op_type for n in model.graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fusedeploy.export_type"] == mode
    assert meta["fusedeploy.method"] == "plain-removal"
    assert meta["fusedeploy.removed_blocks"] == "4,5"
    assert (out / "model.onnx").stat().st_size < 0.75 * sum(  # the embedding Gather stays fp32
        p.stat().st_size for p in tiny_llama_dir.glob("*.safetensors"))
    backend = OnnxRuntimeBackend(out)
    logits = backend.logits(sample_ids)
    assert np.isfinite(logits).all()
    assert len(backend.generate(sample_ids[:10], 5)) == 5


def test_unknown_quantization_and_force(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="unknown ONNX quantization"):
        export_onnx(tiny_llama_dir, tmp_path / "x", quantize="int3")
    (tmp_path / "y").mkdir()
    with pytest.raises(UserError, match="--force"):
        export_onnx(tiny_llama_dir, tmp_path / "y")


def test_corrupt_weights(tiny_llama_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError):
        export_onnx(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_smollm2_onnx_greedy_generation_matches_pytorch(tokenizer, tmp_path):
    from fusedeploy.models.loading import load_model

    out = export_onnx(DEFAULT_MODEL, tmp_path / "smol-onnx")
    model, _, _ = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    backend = OnnxRuntimeBackend(out)
    want = torch_greedy(model, ids, 16)
    assert backend.generate(ids, 16) == want
    got, ref = backend.logits(ids), TorchBackend(model).logits(ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert Path(out / "tokenizer.json").is_file()
