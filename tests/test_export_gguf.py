"""GGUF export through llama.cpp's own converter, checked in the real llama.cpp runtime (no mocks).

Tiny random models of every family, with blocks removed, check f32 logit
parity with PyTorch, the per-block facts and tokenization for each kind of
tokenizer and RoPE scaling; the built-in SmolLM2-135M checks tokenization,
generation and the external perplexity cross-check against the package's
original Q4_1 file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters.gguf import check_per_block, check_tokenization, export_gguf, per_block_facts
from exporters.verify import verify_artifact
from fusedeploy import formats
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.data import eval_windows, load_text, tokenize
from fusedeploy.errors import UserError
from fusedeploy.evaluate import LlamaCppBackend, TorchBackend, perplexity
from fusedeploy.models import ADAPTERS
from fusedeploy.models.loading import resolve_model, save_tokenizer

from .conftest import SAMPLE_TEXT
from .tiny import tiny_model

# A tiny Qwen2 borrowing the built-in model's GGUF-born tokenizer: under transformers 5, llama.cpp's qwen2
# path tokenizes the probe's runs of spaces differently from the tokenizer transformers rebuilds from that
# GGUF, so the export's parity check refuses it (one error line). Real Qwen2 checkpoints carry their own
# tokenizer.json; this borrowed pairing is the known gap, kept visible rather than dropped.
_QWEN2_BORROWED_TOKENIZER = pytest.mark.xfail(strict=True, raises=UserError, reason=(
    "llama.cpp's qwen2 path and transformers 5's GGUF-rebuilt tokenizer disagree on runs of spaces"))
FAMILIES = ["llama", "mistral", pytest.param("qwen2", marks=_QWEN2_BORROWED_TOKENIZER), "qwen3", "gemma3_text",
            "ministral3", "qwen3_5_text"]
REMOVED = (1, 3)  # of the tiny models' 6 blocks


def wikitext(chars: int) -> str:
    """WikiText-style text (tests/data, with `<unk>` and ` @-@ `), then the built-in corpus, cut at `chars`."""
    return (SAMPLE_TEXT.read_text(encoding="utf-8") + load_text("builtin"))[:chars]


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


def save_tiny(mt, tokenizer, folder: Path, remove=(), qk_scale: float = 1.0, **overrides):
    """A tiny model; `qk_scale` sharpens attention so that positions (RoPE, windows) move the logits."""
    import torch

    model = tiny_model(mt, len(tokenizer), **overrides)
    with torch.no_grad():
        for block in model.model.layers:
            if hasattr(block, "self_attn"):  # (Qwen 3.5's linear-attention blocks have none)
                block.self_attn.q_proj.weight.mul_(qk_scale)
                block.self_attn.k_proj.weight.mul_(qk_scale)
    if remove:
        ADAPTERS[mt].remove_blocks(model, list(remove))
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return model


def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    backend = LlamaCppBackend(path, n_ctx=n_ctx)
    try:
        return backend.logits(ids)
    finally:
        backend.close()


def assert_logits_match(got: np.ndarray, want: np.ndarray, rel: float = 2e-3) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() < rel * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.98


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """The feature under test changes the output, so matching PyTorch with it means something."""
    assert np.abs(a - b).max() > 0.05 * np.abs(a).max()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_f32(request, tokenizer, tmp_path_factory):
    """A tiny model of each family with blocks 1 and 3 of 6 removed, exported to f32."""
    mt = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{mt}")
    model = save_tiny(mt, tokenizer, folder / "hf", REMOVED)
    path = export_gguf(folder / "hf", folder / "model-f32.gguf", "f32")
    return mt, model, path


def test_tiny_f32_matches_pytorch(tiny_f32, sample_ids):
    _, model, path = tiny_f32
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        assert backend.block_count == 6 - len(REMOVED)
        got = backend.logits(sample_ids)
    finally:
        backend.close()
    assert_logits_match(got, TorchBackend(model).logits(sample_ids))


def test_tiny_byte_level_bpe_tokenizer_matches_hf(tiny_f32, tokenizer):
    """Byte-level BPE (SmolLM2's, carried over from its original GGUF) tokenizes WikiText-2 as HF does."""
    _, _, path = tiny_f32
    text = wikitext(50_000)
    backend = LlamaCppBackend(path, n_ctx=64)
    try:
        assert backend.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        backend.close()


# ---------------------------------------------------------------- per-block facts after removal


@pytest.mark.parametrize("tiny_f32", ["gemma3_text"], indirect=True)
def test_gemma3_sliding_pattern_after_removal(tiny_f32, sample_ids):
    """Each kept block keeps its own attention kind; llama.cpp's default ("every 6th is global") would not."""
    import gguf

    mt, model, path = tiny_f32
    kinds = model.config.layer_types
    assert kinds == ["sliding_attention"] * 3 + ["full_attention"]  # blocks 0, 2, 4, 5 of 6
    reader = gguf.GGUFReader(path)
    assert [bool(v) for v in reader.get_field("gemma3.attention.sliding_window_pattern").contents()] == \
        [True, True, True, False]
    assert reader.get_field("gemma3.attention.sliding_window").contents() == 32
    assert len(sample_ids) > 32
    # the pattern llama.cpp would assume for 4 blocks (all sliding) gives other logits
    import copy

    all_sliding = copy.deepcopy(model)
    all_sliding.config.layer_types = ["sliding_attention"] * 4
    for block in all_sliding.model.layers:
        block.attention_type = "sliding_attention"
        block.self_attn.is_sliding = True
        block.self_attn.sliding_window = 32
    assert_differs(TorchBackend(all_sliding).logits(sample_ids), TorchBackend(model).logits(sample_ids))


@pytest.mark.parametrize("tiny_f32", ["gemma3_text"], indirect=True)
def test_stale_per_block_fact_is_refused(tiny_f32):
    mt, model, path = tiny_f32
    import copy

    facts = per_block_facts(path)
    check_per_block(facts, model.config)
    stale = copy.deepcopy(model.config)
    stale.layer_types = ["sliding_attention"] * 4
    with pytest.raises(UserError, match="sliding-window pattern"):
        check_per_block(facts, stale)
    stale.num_hidden_layers = 6
    with pytest.raises(UserError, match="block_count 4"):
        check_per_block(facts, stale)
    facts["arrays"]["attention.sliding_window_pattern"] = [True] * 6  # as llama.cpp's --prune-layers leaves it
    with pytest.raises(UserError, match="6 entries for 4 blocks"):
        check_per_block(facts, model.config)


# ---------------------------------------------------------------- SentencePiece


def train_sentencepiece(folder: Path, name: str, **settings) -> Path:
    """A SentencePiece BPE model trained here on the tests' text with Llama 2's trainer settings."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text(wikitext(10**7), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / name), model_type="bpe", vocab_size=2000,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        num_threads=1, minloglevel=2, **settings)
    return folder / f"{name}.model"


@pytest.fixture(scope="module")
def spm_tokenizers(tmp_path_factory):
    """{"llama2": Llama 2's settings and tokenizer.json layout, "gemma": the same without a dummy prefix}."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("spm")
    llama2 = train_sentencepiece(folder, "llama2", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    gemma = train_sentencepiece(folder, "gemma", add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3)

    def converted(model: Path, **config):
        """The fast tokenizer transformers converts from a folder holding only the SentencePiece model."""
        tok_dir = folder / model.stem
        tok_dir.mkdir()
        shutil.copyfile(model, tok_dir / "tokenizer.model")
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
        return AutoTokenizer.from_pretrained(tok_dir)

    return {
        # as Llama 2's tokenizer.json: Prepend("▁") + Replace(" ", "▁") normalizer, byte-fallback BPE
        "llama2": converted(llama2, tokenizer_class="LlamaTokenizer", legacy=True, add_prefix_space=True),
        "gemma": converted(gemma, tokenizer_class="GemmaTokenizer"),
    }


@pytest.fixture(scope="module")
def spm_tokenizer(spm_tokenizers):
    return spm_tokenizers["llama2"]


@pytest.mark.parametrize("mt,style", [("llama", "llama2"), ("mistral", "llama2"), ("gemma3_text", "gemma")])
def test_sentencepiece_tokenizer(mt, style, spm_tokenizers, tmp_path):
    model = save_tiny(mt, spm_tokenizers[style], tmp_path / "hf", REMOVED)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes()[:4] != b"GGUF"  # a real SentencePiece model
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    import gguf

    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.model").contents() == "llama"
    # The reference is the tokenizer the model was trained with, SentencePiece itself: transformers 5's
    # fast tokenizer converted from it can differ at a word-start marker (a warning at export).
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    text = wikitext(50_000)
    backend = LlamaCppBackend(path, n_ctx=128)
    try:
        assert backend.tokenize(text) == sp.encode(text)
        ids = sp.encode(wikitext(3000))[:100]
        got = backend.logits(ids)
    finally:
        backend.close()
    assert_logits_match(got, TorchBackend(model).logits(ids))


@pytest.mark.parametrize("tiny_f32", ["llama"], indirect=True)
def test_tokenization_check_fails_on_a_mismatch(tiny_f32, spm_tokenizer, tmp_path):
    """The post-conversion probe refuses a GGUF whose tokenizer is not the folder's."""
    _, _, path = tiny_f32
    spm_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="tokenizes differently"):
        check_tokenization(path, tmp_path)


# ---------------------------------------------------------------- SentencePiece as the reference


def _llama2_sentencepiece(folder: Path, vocab_size: int = 600) -> Path:
    """A small byte-fallback BPE SentencePiece model with Llama 2's settings, trained from ~30 KB in about a second."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(load_text("builtin")[:30000])
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "m"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return folder / "m.model"


def _llama2_checkpoint(spm_model: Path, folder: Path, tokenizer_config: dict, tokenizer_json_from: dict) -> Path:
    """A tiny Llama-2-style checkpoint: the SentencePiece model as tokenizer.model, beside a fast tokenizer.json
    converted from it by transformers (with `tokenizer_json_from` settings) and `tokenizer_config`."""
    import shutil

    from transformers import AutoTokenizer

    convert = folder.with_name(folder.name + "-convert")
    convert.mkdir(parents=True)
    shutil.copy(spm_model, convert / "tokenizer.model")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (convert / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **specials,
                                                               **tokenizer_json_from}))
    fast = AutoTokenizer.from_pretrained(convert)
    save_tiny("llama", fast, folder)
    shutil.copy(spm_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, **tokenizer_config}))
    return folder


# (id, tokenizer_config.json, settings the fast tokenizer.json was converted with, warning expected)
SPM_CASES = [
    ("fast-tokenizer-agrees", {"tokenizer_class": "LlamaTokenizer"}, {}, None),
    # tokenizer.json converted without the leading "▁" while nothing in the config says so: llama.cpp's
    # converter takes the SentencePiece model's own add_dummy_prefix, as the model was trained
    ("fast-tokenizer-lost-the-leading-space", {"tokenizer_class": "PreTrainedTokenizerFast"},
     {"add_prefix_space": False}, "first difference at token 0"),
    # an explicit add_prefix_space: the converter, the fast tokenizer and the reference all follow it
    ("config-turns-the-leading-space-off", {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False},
     {"add_prefix_space": False}, None),
]


@pytest.fixture(scope="module")
def llama2_spm(tmp_path_factory):
    return _llama2_sentencepiece(tmp_path_factory.mktemp("llama2-spm"))


@pytest.mark.parametrize("case_id,config,converted,warning", SPM_CASES, ids=[c[0] for c in SPM_CASES])
def test_sentencepiece_is_the_reference_of_the_tokenization_check(run_cli, llama2_spm, tmp_path, caplog, case_id,
                                                                   config, converted, warning):
    import sentencepiece as spm

    from exporters.gguf import _llama_cpp_tokenize, probe_text

    from .test_bad_inputs import tree_digest

    folder = _llama2_checkpoint(llama2_spm, tmp_path / "hf", config, converted)
    before = tree_digest(folder)
    code, _, err = run_cli("export", "gguf", "--model", folder, "--out", tmp_path / "m.gguf", "--type", "f32")
    assert code == 0 and "Traceback" not in err and "error:" not in err, err
    assert tree_digest(folder) == before
    warned = [r.getMessage() for r in caplog.records if "tokenizes differently" in r.getMessage()]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warning in warned[0] and "Hugging Face" in warned[0], warned
    if "add_prefix_space" not in config:  # llama.cpp tokenizes as SentencePiece itself, on the probe and on prose
        sp = spm.SentencePieceProcessor(model_file=str(llama2_spm))
        for text in (probe_text(), load_text("builtin")[-5000:]):
            assert _llama_cpp_tokenize(tmp_path / "m.gguf", text)[0] == sp.encode(text)


def test_llama_cpp_disagreeing_with_sentencepiece_is_refused(run_cli, llama2_spm, tmp_path, monkeypatch):
    import exporters.gguf as gguf_exporter

    from .test_bad_inputs import tree_digest

    folder = _llama2_checkpoint(llama2_spm, tmp_path / "hf", {"tokenizer_class": "LlamaTokenizer"}, {})
    real = gguf_exporter._sentencepiece_ids
    monkeypatch.setattr(gguf_exporter, "_sentencepiece_ids", lambda f, t: [3, *real(f, t)])  # a reference one token off
    before = tree_digest(tmp_path)
    code, _, err = run_cli("export", "gguf", "--model", folder, "--out", tmp_path / "m.gguf", "--type", "f32")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "SentencePiece" in lines[0] and "first difference at token 0" in lines[0]
    assert tree_digest(tmp_path) == before  # no output, no temporary, nothing of the folder changed

    other = _llama2_sentencepiece(tmp_path / "other-spm", vocab_size=500)  # a real, different SentencePiece model
    monkeypatch.setattr(gguf_exporter, "_sentencepiece_ids", real)
    assert run_cli("export", "gguf", "--model", folder, "--out", tmp_path / "m.gguf", "--type", "f32")[0] == 0
    import shutil

    shutil.copy(other, folder / "tokenizer.model")
    with pytest.raises(UserError, match="SentencePiece model"):
        check_tokenization(tmp_path / "m.gguf", folder)


# ---------------------------------------------------------------- RoPE scaling


def long_ids(tokenizer, n: int) -> list[int]:
    return tokenizer(wikitext(20_000), add_special_tokens=False)["input_ids"][:n]


@pytest.mark.parametrize("mt,scaling", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}),
    pytest.param("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                 marks=_QWEN2_BORROWED_TOKENIZER),  # YaRN stays covered by qwen3 below
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
], ids=["llama3", "yarn-qwen2", "yarn-qwen3"])
def test_rope_scaling_beyond_original_context(mt, scaling, tokenizer, tmp_path):
    """Sequences 4x the original context: llama.cpp applies the same scaled RoPE as PyTorch."""
    model = save_tiny(mt, tokenizer, tmp_path / "hf", REMOVED, qk_scale=4.0, rope_scaling=scaling,
                      max_position_embeddings=256, rope_theta=10000.0)
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    ids = long_ids(tokenizer, 256)
    want = TorchBackend(model).logits(ids)
    assert_logits_match(llama_cpp_logits(path, ids, n_ctx=256), want)
    plain = save_tiny(mt, tokenizer, tmp_path / "plain", REMOVED, qk_scale=4.0, max_position_embeddings=256,
                      rope_theta=10000.0)  # the same weights without the scaling
    assert_differs(TorchBackend(plain).logits(ids), want)


# ---------------------------------------------------------------- every type, provenance


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
    got = llama_cpp_logits(path, sample_ids)
    # a random tiny model has near-tied logits, so check closeness, not argmax
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert corr > (0.999 if spec.made_by == formats.LLAMA_CONVERTER else 0.9)

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
    assert np.isfinite(llama_cpp_logits(path, [1, 2, 3, 4], n_ctx=64)).all()


def test_imatrix_covers_every_linear_layer(tiny_llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from exporters.gguf import compute_imatrix

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    imatrix = compute_imatrix(model, "llama", load_text("builtin")[:5000], tokenizer, ctx=64, max_windows=2)
    assert len(imatrix) == 6 * 7 + 1  # q k v o gate up down per block, and output
    assert imatrix["blk.0.ffn_down.weight"].shape == (128,) and (imatrix["blk.0.attn_q.weight"] > 0).all()


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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _opt_folder(folder: Path) -> Path:
    """A config of an architecture transformers knows and llama.cpp's converter does not."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    return folder


def test_architecture_unknown_to_the_converter(tmp_path):
    with pytest.raises(UserError, match="unsupported architecture 'OPTForCausalLM'"):
        export_gguf(_opt_folder(tmp_path / "opt"), tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    for args, expect in (((str(tmp_path), "q9"), "unknown GGUF type"),
                         ((str(_opt_folder(tmp_path / "opt")), "f32"), "'OPTForCausalLM'")):
        proc = subprocess.run([sys.executable, "-m", "fusedeploy.cli", "export", "gguf", "--model", args[0],
                               "--out", str(tmp_path / "x.gguf"), "--type", args[1]], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:") and expect in proc.stderr


def test_missing_converter_says_how_to_install(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDEPLOY_LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="make setup"):
        export_gguf(tiny_llama_dir, tmp_path / "x.gguf", "f32")


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
    save_tokenizer(tokenizer, tmp_path / "hf")
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

