"""ONNX export in the real ONNX Runtime, no mocks: fp32 parity, greedy generation.

The default export is ONNX Runtime GenAI's builder (run by `og.Generator`).
The Optimum engine (standard operators) is optional: its tests run where an
optimum-onnx that supports the installed transformers is present, and its
refusal is tested where it is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx import export_onnx
from fusedeploy import formats
from fusedeploy.errors import UserError
from fusedeploy.optional import require_optimum
from fusedeploy.evaluate import OnnxRuntimeBackend, TorchBackend
from fusedeploy.models import ADAPTERS
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.models.loading import resolve_model, save_tokenizer

from .tiny import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "ministral3", "qwen3_5_text"]


def _optimum_usable() -> bool:
    try:
        require_optimum("test")
    except UserError:
        return False
    return True


needs_optimum = pytest.mark.skipif(not _optimum_usable(), reason="no optimum-onnx release supports this transformers")


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


def _tiny(mt, tokenizer, remove=()):
    # the tiny qwen2 config sets no eos/pad ids: the exporter must take the tokenizer's
    model = tiny_model(mt, len(tokenizer))
    if remove:
        ADAPTERS[mt].remove_blocks(model, list(remove))
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_genai(request, tokenizer, tmp_path_factory):
    """Every family with blocks 1 and 3 of 6 removed; for Gemma 3 that breaks the 5:1 sliding pattern."""
    mt = request.param
    folder = tmp_path_factory.mktemp(f"genai-{mt}")
    model = _tiny(mt, tokenizer, remove=(1, 3))
    model.save_pretrained(folder / "hf")
    save_tokenizer(tokenizer, folder / "hf")
    out = export_onnx(folder / "hf", folder / "onnx")
    return model, out


def test_genai_fp32_logits_and_greedy_generation(tiny_genai, sample_ids):
    model, out = tiny_genai
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 4
    assert isinstance(config["model"]["eos_token_id"], (int, list))
    assert isinstance(config["model"]["pad_token_id"], int)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops
    backend = OnnxRuntimeBackend(out)
    assert backend.genai
    got = backend.logits(sample_ids)  # 60 tokens: past Gemma 3's 32-token sliding window
    want = TorchBackend(model).logits(sample_ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
    assert backend.generate(sample_ids[:20], 12) == torch_greedy(model, sample_ids[:20], 12)
    seq = [backend.start(sample_ids[:20])]  # the profiler's prefill/step protocol
    while len(seq) < 6:
        seq.append(backend.step(seq[-1]))
    assert seq == torch_greedy(model, sample_ids[:20], 6)


def test_gemma3_sliding_layers_follow_layer_types(tokenizer, tmp_path):
    """After removal Gemma 3's local/global pattern is the renumbered layer_types, not the builder's (i+1) % 6."""
    model = _tiny("gemma3_text", tokenizer, remove=(1, 3))
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    model.save_pretrained(tmp_path / "hf")
    save_tokenizer(tokenizer, tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    windows = []
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            windows.append(attrs.get("local_window_size", -1))
    assert windows == [32, 32, 32, -1]


@pytest.fixture(scope="module")
def tiny_optimum(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("optimum-llama")
    model = _tiny("llama", tokenizer, remove=(1, 3))
    model.save_pretrained(folder / "hf")
    save_tokenizer(tokenizer, folder / "hf")
    return model, export_onnx(folder / "hf", folder / "onnx", engine="optimum")


@needs_optimum
def test_optimum_fp32_logits_and_cached_generation(tiny_optimum, sample_ids):
    model, out = tiny_optimum
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert sum(name.startswith("past_key_values.") for name in inputs) == 2 * 4
    assert not {n.domain for n in graph.node} - {"", "ai.onnx"}  # standard operators only: why this engine exists
    backend = OnnxRuntimeBackend(out)
    assert not backend.genai
    got = backend.logits(sample_ids)
    want = TorchBackend(model).logits(sample_ids)
    assert np.abs(got - want).max() < 1e-4
    assert backend.generate(sample_ids[:20], 12) == torch_greedy(model, sample_ids[:20], 12)


@pytest.fixture(scope="module")
def tiny_llama_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama") / "hf"
    tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    (folder / "compression.json").write_text(json.dumps(
        {"method": "plain-removal", "removed_blocks": [4, 5], "settings": {"k": 2}}))
    return folder


@pytest.mark.parametrize("mode,op,engine", [
    pytest.param("int8", "MatMulInteger", "optimum", marks=needs_optimum),
    pytest.param("int4", "MatMulNBits", "optimum", marks=needs_optimum),
    ("int8", "MatMulNBits", "genai"), ("int4", "MatMulNBits", "genai")])
def test_quantized_variants_run_with_provenance(mode, op, engine, tiny_llama_dir, sample_ids, tmp_path):
    out = export_onnx(tiny_llama_dir, tmp_path / mode, quantize=mode, engine=engine)
    model = onnx.load(str(out / "model.onnx"))
    assert op in {n.op_type for n in model.graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fusedeploy.export_type"] == mode
    assert meta["fusedeploy.method"] == "plain-removal"
    assert meta["fusedeploy.removed_blocks"] == "4,5"
    assert meta["fusedeploy.exporter"] == ("optimum" if engine == "optimum" else "onnxruntime-genai builder")
    assert sum(f.stat().st_size for f in out.glob("model.onnx*")) < 0.75 * sum(  # the embedding Gather stays fp32
        p.stat().st_size for p in tiny_llama_dir.glob("*.safetensors"))
    backend = OnnxRuntimeBackend(out)
    logits = backend.logits(sample_ids)
    assert np.isfinite(logits).all()
    assert len(backend.generate(sample_ids[:10], 5)) == 5


def test_genai_int4_options_reach_the_graph(tiny_llama_dir, tmp_path):
    out = export_onnx(tiny_llama_dir, tmp_path / "q", quantize="int4", block_size=64, algo="rtn_last")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert {v["block_size"] for v in nbits.values()} == {64}
    head = [v["bits"] for k, v in nbits.items() if "lm_head" in k]
    assert head == [8] and {v["bits"] for k, v in nbits.items() if "lm_head" not in k} == {4}  # *_last: head int8


@pytest.mark.skipif(_optimum_usable(), reason="an optimum-onnx that supports this transformers is installed")
def test_optimum_engine_without_a_fitting_exporter_is_one_line_before_any_work(tiny_llama_dir, tmp_path, run_cli):
    code, out, err = run_cli("export", "onnx", "--model", tiny_llama_dir, "--out", tmp_path / "o", "--engine", "optimum")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --engine optimum needs Optimum")
    assert "fusedeploy[optimum]" in lines[0] and "--engine genai" in lines[0]
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", formats.precision_names("onnxruntime"))
def test_every_listed_precision_exports_and_runs_or_is_refused_up_front(precision, tiny_llama_dir, sample_ids,
                                                                        tmp_path, run_cli):
    """Each precision `--help` lists: on this host either a folder og loads and runs, or one line before any work."""
    row = formats.spec("onnxruntime", precision)
    out = tmp_path / precision
    code, stdout, err = run_cli("export", "onnx", "--model", tiny_llama_dir, "--out", out, "--precision", precision)
    if "cpu" in row.devices:
        assert code == 0, err
        backend = OnnxRuntimeBackend(out)
        logits = backend.logits(sample_ids[:16])
        assert logits.shape[0] == 16 and np.isfinite(logits).all()
        assert formats.Artifact.at(out).precision == precision
    else:  # a CUDA-only precision on a host whose onnxruntime-genai has no CUDA provider
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "no CUDA provider" in lines[0]
        assert not out.exists()


def test_an_export_that_does_not_load_is_never_written(tiny_llama_dir, tmp_path, monkeypatch):
    """The smoke run refuses a folder its runtime cannot run (here: a graph broken after the builder wrote it)."""
    import exporters.onnx_genai as genai

    real_stamp = genai._stamp

    def stamp_then_break(path, meta, *rest):
        real_stamp(path, meta, *rest)
        model = onnx.load(str(path), load_external_data=False)
        model.graph.node[0].op_type = "NoSuchOperator"
        onnx.save_model(model, str(path))

    monkeypatch.setattr(genai, "_stamp", stamp_then_break)
    with pytest.raises(UserError, match="does not run in onnxruntime.*nothing was written"):
        export_onnx(tiny_llama_dir, tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []


def test_unknown_quantization_and_force(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="unknown onnxruntime precision"):
        export_onnx(tiny_llama_dir, tmp_path / "x", quantize="int3")
    with pytest.raises(UserError, match="unknown quantization method"):
        export_onnx(tiny_llama_dir, tmp_path / "x", quantize="int4", algo="gptq")
    with pytest.raises(UserError, match="apply to int4 and int8"):
        export_onnx(tiny_llama_dir, tmp_path / "x", block_size=64)
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
