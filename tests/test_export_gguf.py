"""GGUF export in the real llama.cpp runtime (llama-cpp-python), no mocks.

Tiny random models of every adapter check structure and f32 parity fast;
the built-in SmolLM2-135M checks tokenization, generation and the external
perplexity cross-check against the package's original Q4_1 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.gguf import export_gguf
from exporters.verify import verify_artifact
from fusedeploy import formats
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.data import eval_windows, load_text, tokenize
from fusedeploy.errors import UserError
from fusedeploy.evaluate import LlamaCppBackend, TorchBackend, perplexity
from fusedeploy.models import ADAPTERS
from fusedeploy.models.loading import resolve_model

from .tiny import tiny_model

WIKITEXT = Path("/work/shared/data/wikitext-2/test.txt")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def wikitext(chars: int) -> str:
    if WIKITEXT.is_file():
        return WIKITEXT.read_text(encoding="utf-8")[:chars]
    return load_text("builtin")[:chars]


@pytest.fixture(scope="module")
def smol_source():
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tokenizer(smol_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_source.location)


@pytest.fixture(scope="module")
def sample_ids(tokenizer):
    # 100 tokens: longer than the tiny Gemma 3's 32-token sliding window
    return tokenizer(wikitext(3000), add_special_tokens=False)["input_ids"][:100]


def save_tiny(mt, tokenizer, folder: Path, remove=()):
    model = tiny_model(mt, len(tokenizer))
    if remove:
        ADAPTERS[mt].remove_blocks(model, list(remove))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=[(mt, rm) for mt in FAMILIES for rm in ((), (1, 3))],
                ids=lambda p: f"{p[0]}{'-removed' if p[1] else ''}")
def tiny_f32(request, tokenizer, tmp_path_factory):
    mt, remove = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{mt}")
    model = save_tiny(mt, tokenizer, folder / "hf", remove)
    path = export_gguf(folder / "hf", folder / "model-f32.gguf", "f32")
    return model, path, 6 - len(remove)


def test_tiny_f32_matches_pytorch(tiny_f32, sample_ids):
    model, path, blocks = tiny_f32
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        assert backend.block_count == blocks
        got = backend.logits(sample_ids)
    finally:
        backend.close()
    want = TorchBackend(model).logits(sample_ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.98


@pytest.fixture(scope="module")
def tiny_llama_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama") / "hf"
    save_tiny("llama", tokenizer, folder)
    return folder


@pytest.mark.parametrize("qtype", formats.precision_names("llama.cpp"))
def test_tiny_every_catalogue_type_exports_loads_tracks_pytorch_and_verifies(qtype, tiny_llama_dir, sample_ids,
                                                                             tmp_path):
    """Every GGUF row of fusedeploy.formats, so a new type is tested by adding its row."""
    import gguf

    spec = formats.spec("llama.cpp", qtype)
    path = export_gguf(tiny_llama_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("fusedeploy.export_type").contents() == qtype
    assert reader.get_field("general.file_type").contents() == spec.llama_file_type()
    assert reader.get_field("llama.block_count").contents() == 6
    from transformers import AutoModelForCausalLM

    want = TorchBackend(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()).logits(sample_ids)
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        got = backend.logits(sample_ids)
    finally:
        backend.close()
    # a random tiny model has near-tied logits, so check closeness, not argmax
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert corr > (0.999 if spec.made_by == formats.GGUF_PY else 0.9)

    result = verify_artifact(path, str(tiny_llama_dir), "builtin", ctx=64, max_windows=2)
    assert result.export_type == qtype and result.tolerances == spec.limits
    assert result.ppl_ratio < spec.limits["ppl_ratio_max"]
    if spec.tolerance == "4bit":  # near-tied logits may flip the argmax under 4-bit rounding; nothing else may fail
        assert all(f.startswith("top-1 agreement") for f in result.failures), result.failures
    else:
        assert result.passed, result.failures


def test_provenance_and_imatrix(tiny_llama_dir, tmp_path):
    import gguf

    (tiny_llama_dir / "compression.json").write_text(json.dumps(
        {"method": "fusegpt", "removed_blocks": [2, 7, 9], "settings": {"sparsity": 0.25}}))
    try:
        path = export_gguf(tiny_llama_dir, tmp_path / "q.gguf", "q4_k_m", imatrix_text=load_text("builtin")[:20000])
    finally:
        (tiny_llama_dir / "compression.json").unlink()
    reader = gguf.GGUFReader(path)
    assert reader.get_field("fusedeploy.method").contents() == "fusegpt"
    assert reader.get_field("fusedeploy.removed_blocks").contents() == [2, 7, 9]
    assert len(reader.get_field("fusedeploy.settings_hash").contents()) == 16
    assert reader.get_field("fusedeploy.imatrix").contents() == "pytorch-hooks"
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    backend = LlamaCppBackend(path, n_ctx=64)
    try:
        assert np.isfinite(backend.logits([1, 2, 3, 4])).all()
    finally:
        backend.close()


def test_tiny_tokenizer_detected_pre_matches_hf(tiny_f32, tokenizer):
    """A folder with only tokenizer.json (no origin GGUF) still tokenizes exactly as HF."""
    _, path, _ = tiny_f32
    text = wikitext(50_000)
    backend = LlamaCppBackend(path, n_ctx=64)
    try:
        assert backend.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        backend.close()


# ---------------------------------------------------------------- errors


def test_unknown_type(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="unknown GGUF type"):
        export_gguf(tiny_llama_dir, tmp_path / "x.gguf", "q3_xyz")


def test_existing_output_needs_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="did not make"):
        export_gguf(tiny_llama_dir, out, "f32")
    with pytest.raises(UserError, match="did not make"):  # not ours: --force does not replace it either
        export_gguf(tiny_llama_dir, out, "f32", force=True)
    assert out.read_bytes() == b"keep me"
    out.unlink()
    export_gguf(tiny_llama_dir, out, "f32")
    with pytest.raises(UserError, match="--force"):
        export_gguf(tiny_llama_dir, out, "f32")
    export_gguf(tiny_llama_dir, out, "f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_corrupt_weights(tiny_llama_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(UserError, match="cannot read the weights"):
        export_gguf(bad, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="unsupported architecture"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "f32")


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fusedeploy.cli", "export", "gguf", "--model", str(tmp_path),
                           "--out", str(tmp_path / "x.gguf"), "--type", "q9"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown GGUF type" in proc.stderr


# ---------------------------------------------------------------- SmolLM2-135M


@pytest.fixture(scope="module")
def smol_f16(smol_source, tmp_path_factory):
    return export_gguf(DEFAULT_MODEL, tmp_path_factory.mktemp("smol") / "smol-f16.gguf", "f16")


@pytest.mark.slow
def test_smollm2_tokenization_matches_hf(smol_f16, tokenizer):
    text = wikitext(200_000)
    backend = LlamaCppBackend(smol_f16, n_ctx=64)
    try:
        assert backend.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        backend.close()


@pytest.mark.slow
def test_smollm2_generates_text_and_metadata(smol_f16, tokenizer):
    import gguf

    reader = gguf.GGUFReader(smol_f16)
    assert reader.get_field("llama.block_count").contents() == 30
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"
    backend = LlamaCppBackend(smol_f16, n_ctx=128)
    try:
        ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
        new = backend.generate(ids, 12)
    finally:
        backend.close()
    text = tokenizer.decode(new)
    assert len(new) == 12 and len(text.strip()) > 5


@pytest.mark.slow
def test_smollm2_f16_perplexity_cross_check_with_original_q4_1(smol_f16, smol_source, tokenizer):
    """llama.cpp PPL of our f16 export is within 1 % of llama.cpp PPL of the original Q4_1 file."""
    windows = eval_windows(tokenize(tokenizer, wikitext(60_000)), 512, 3)
    ppl = {}
    for name, path in (("export", smol_f16), ("original", smol_source.origin_gguf)):
        backend = LlamaCppBackend(path, n_ctx=512)
        try:
            ppl[name] = perplexity(backend, windows).ppl
        finally:
            backend.close()
    assert abs(ppl["export"] / ppl["original"] - 1) < 0.01, ppl


@pytest.mark.slow
def test_smollm2_with_blocks_removed_f32(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusedeploy.models.loading import load_model

    model, _, _ = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    ADAPTERS["llama"].remove_blocks(model, [3, 7, 11, 15, 19, 23, 26, 28])
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    path = export_gguf(tmp_path / "hf", tmp_path / "r.gguf", "f32")
    ids = tokenizer(wikitext(3000), add_special_tokens=False)["input_ids"][:128]
    want = TorchBackend(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()).logits(ids)
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        assert backend.block_count == 22
        got = backend.logits(ids)
    finally:
        backend.close()
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99

