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

from .conftest import SAMPLE_TEXT
from .tiny import tiny_config, tiny_model

REL = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).location)


@pytest.fixture(scope="module")
def ids(tokenizer):
    text = SAMPLE_TEXT.read_text(encoding="utf-8")[:3000]
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


# ---------------------------------------------------------------- Qwen 3.5 (hybrid linear/full attention)


def test_qwen35_fusion_grafts_only_matching_mixers():
    """p's MLP goes into every neighbour, its attention only into neighbours of its kind; the rest is said."""
    from fusedeploy.compress import FusedLinear, fold_model, load_recipe
    from fusedeploy.compress.distill import REPAIRS, attach_fusion
    from fusedeploy.compress.runner import BlockRunner

    model = tiny_model("qwen3_5_text", 300).requires_grad_(False)
    adapter = ADAPTERS["qwen3_5_text"]
    runner = BlockRunner(model, adapter, torch.device("cpu"), torch.float32)
    runner.capture_kwargs(16)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = load_recipe("quick", {"group_size": 3})
    # group [0, 4) around the full-attention block 1: neighbours 0, 2 (linear) and 3 (full)
    assert attach_fusion(runner, 0, 4, 1, REPAIRS["fusion"], settings) == []
    terms = {(i, n): m._n_terms for i in (0, 2, 3) for n, m in adapter.blocks(model)[i].named_modules()
             if isinstance(m, FusedLinear)}
    assert terms[(3, "self_attn.q_proj")] == 1 and terms[(0, "linear_attn.in_proj_qkv")] == 0
    assert terms[(0, "mlp.down_proj")] == terms[(2, "mlp.down_proj")] == 1
    fold_model(adapter, model)
    # a group of one neighbour of the other kind: p's attention has nowhere to go and is reported
    model = tiny_model("qwen3_5_text", 300).requires_grad_(False)
    runner = BlockRunner(model, adapter, torch.device("cpu"), torch.float32)
    runner.capture_kwargs(16)
    with torch.no_grad():
        pruned = tiny_model("qwen3_5_text", 300)
        adapter.remove_blocks(pruned, [1])
        want = pruned(ids, use_cache=False).logits
    dropped = attach_fusion(runner, 1, 3, 1, REPAIRS["fusion"], load_recipe("quick", {"group_size": 1}))
    assert dropped == [f"self_attn.{n}" for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
    runner.remove(1)
    with torch.no_grad():  # at init the fused neighbour computes its own function: the model is the pruned one
        torch.testing.assert_close(model(ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


def test_qwen35_gguf_recurrent_layers_follow_layer_types(tokenizer, ids, tmp_path):
    """After removal llama.cpp's per-block recurrent flags are the kept blocks' kinds; no MTP is expected."""
    import gguf

    model = tiny_model("qwen3_5_text", len(tokenizer))
    save(model, tokenizer, tmp_path / "hf", remove=(1, 4))
    assert model.config.layer_types == ["linear_attention", "linear_attention", "full_attention", "full_attention"]
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "qwen35"
    assert reader.get_field("qwen35.block_count").contents() == 4
    assert [bool(v) for v in reader.get_field("qwen35.attention.recurrent_layers").contents()] == \
        [True, True, False, False]
    assert reader.get_field("qwen35.nextn_predict_layers") is None
    assert rel_err(gguf_logits(path, ids), TorchBackend(model).logits(ids)) <= REL


def test_qwen35_onnx_after_removal(tokenizer, ids, tmp_path):
    model = tiny_model("qwen3_5_text", len(tokenizer))
    save(model, tokenizer, tmp_path / "hf", remove=(1, 4))
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx")
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 4
    assert rel_err(OnnxRuntimeBackend(out).logits(ids), TorchBackend(model).logits(ids)) <= REL


# ---------------------------------------------------------------- Mistral 4 (refused)


def _tiny_mistral4(tokenizer, folder: Path) -> Path:
    from transformers import AutoConfig
    from transformers.models.mistral4.modeling_mistral4 import Mistral4ForCausalLM  # (no Auto class maps it)

    config = AutoConfig.for_model("mistral4", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, max_position_embeddings=256)
    Mistral4ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_mistral4_is_refused_in_one_line(tokenizer, tmp_path, run_cli, capsys):
    from fusedeploy.models import adapter_for

    folder = _tiny_mistral4(tokenizer, tmp_path / "m4")
    from transformers import AutoConfig

    with pytest.raises(UserError, match="Mistral 4 .* fusion and the fold into dense weights are not defined"):
        adapter_for(AutoConfig.from_pretrained(folder))
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 2000)
    capsys.readouterr()  # (the save's progress bar)
    code, out, err = run_cli("compress", "--model", folder, "--sparsity", "0.25", "--calib", calib,
                             "--out", tmp_path / "out", "--recipe", "quick")
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [next(l for l in err.splitlines() if "error:" in l)]
    assert "Mistral 4" in err and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="Mistral 4"):
        export_onnx(folder, tmp_path / "onnx")
    # llama.cpp's converter takes Mistral 4 only inside the Mistral 3 VLM checkpoint, not a text one
    with pytest.raises(UserError, match="does not know it"):
        export_gguf(folder, tmp_path / "m4.gguf", "f32")


# ---------------------------------------------------------------- Gemma 4 (per-layer inputs, shared K/V)


def test_gemma4_removal_slices_per_layer_inputs_and_renumbers_everything(tmp_path):
    """Tiny: [s, f, s, f, s, f], blocks 2/3 store K/V, 4/5 read it. Removing 1 (full) and 4 (a sliding reader)."""
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    model = tiny_model("gemma4_text", 256)
    adapter = ADAPTERS["gemma4_text"]
    decoder = model.model
    table, proj = decoder.embed_tokens_per_layer.weight.clone(), decoder.per_layer_model_projection.weight.clone()
    assert model.config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse"]
    kept = adapter.remove_blocks(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    config = model.config
    # each kept block keeps its own slice of the per-layer table and projection (8 wide per block)
    cols = [c for i in kept for c in range(8 * i, 8 * i + 8)]
    assert torch.equal(decoder.embed_tokens_per_layer.weight, table[:, cols])
    assert torch.equal(decoder.per_layer_model_projection.weight, proj[cols])
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    assert config.num_kv_shared_layers == 1 and decoder.first_kv_shared_layer_idx == 3
    assert config.kv_sharing_modes == [None, "store", "store", "reuse"]
    assert [b.self_attn.is_kv_shared_layer for b in decoder.layers] == [False, False, False, True]
    # full-attention head_dim (per_layer_config) renumbered onto the kept full blocks
    assert [config.per_layer_config[i].head_dim for i in range(4)] == [16, 16, 32, 32]
    assert [b.self_attn.head_dim for b in decoder.layers] == [16, 16, 32, 32]
    model.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.num_hidden_layers == 4 and saved.num_kv_shared_layers == 1
    assert [saved.per_layer_config[i].head_dim for i in range(4)] == [16, 16, 32, 32]

    # the per-layer inputs depend on the token ids: ids of the whole vocabulary, and a cached decode
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = tiny_model("gemma4_text", 256)  # the unpruned model with blocks 1 and 4 made identities
    for i in (1, 4):
        reference.model.layers[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, after, rtol=0, atol=0)
        cache = DynamicCache(config=reloaded.config)
        reloaded(ids[:, :30], cache=cache, use_cache=True)
        step = torch.cat([reloaded(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(30, 40)], 1)
        torch.testing.assert_close(step, after[:, 30:], rtol=1e-4, atol=1e-4)
        # each kept block got its own per-layer input and read the K/V of its own storing block
        torch.testing.assert_close(reference(ids).logits, after, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_model("gemma4_text", 256)(ids).logits, after)


def test_gemma4_refuses_removing_a_block_whose_kv_others_read():
    model = tiny_model("gemma4_text", 128)
    adapter = ADAPTERS["gemma4_text"]
    with pytest.raises(UserError, match=r"cannot remove Gemma 4 block\(s\) \[3\]: they store the K/V that block\(s\) "
                                        r"\[5\] read") as err:
        adapter.remove_blocks(model, [3])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"last kept block \(4\) would be sliding_attention"):
        adapter.remove_blocks(model, [5])
    assert len(adapter.blocks(model)) == 6 and model.config.num_hidden_layers == 6  # nothing was touched
    # removing every reader is fine: the storing blocks just have no readers left
    adapter.remove_blocks(model, [4, 5])
    assert model.config.num_kv_shared_layers == 0 and model.config.kv_sharing_modes == [None, None, "store", "store"]


def _gemma4_runner(model, seq_len):
    from fusedeploy.compress.runner import BlockRunner

    runner = BlockRunner(model, ADAPTERS["gemma4_text"], torch.device("cpu"), torch.float32)
    runner.capture_kwargs(seq_len)
    return runner


@torch.no_grad()
def _block_inputs(model, ids):
    """What every block receives in the whole model's forward, and the final norm's input."""
    got, hooks = [], [b.register_forward_pre_hook(lambda m, a: got.append(a[0])) for b in model.model.layers]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: got.append(a[0])))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_gemma4_block_replay_equals_the_whole_forward():
    """Block by block, in mini-batches of 2 of 4 different sequences: every block's input and the last output are
    the whole forward's (measured bitwise equal on CPU), because each block gets its own per-layer input slice
    from the token ids and the readers the K/V that the storing blocks wrote. Also after removing blocks 1 and 4,
    and for the MI candidate "without block 4" (a reader)."""
    import copy

    from fusedeploy.compress.scores import ActivationCache, candidate_outputs, mi_scores

    model = tiny_model("gemma4_text", 256).requires_grad_(False)
    runner = _gemma4_runner(model, 40)
    ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    cache = ActivationCache(runner, runner.block0_inputs(ids, 2), batch=2)
    want = _block_inputs(model, ids)
    assert len(cache.states) == len(want) == 7
    for state, ref in zip(cache.states, want):
        torch.testing.assert_close(state.data, ref, rtol=1e-6, atol=1e-6)
    # the K/V of the storing blocks 2 (sliding) and 3 (full) ride with the activations up to their last reader
    assert [sorted(k for k in s.side if k[:2] in ("k:", "v:")) for s in cache.states] == [
        [], [], [], ["k:sliding_attention", "v:sliding_attention"],
        ["k:full_attention", "k:sliding_attention", "v:full_attention", "v:sliding_attention"],
        ["k:full_attention", "v:full_attention"], []]
    # blocks whose removal is refused (storers 2, 3; block 5 while 4 is sliding) are never candidates
    scores = mi_scores(cache)
    assert [i for i, s in enumerate(scores) if s == float("inf")] == [2, 3, 5]
    without4 = copy.deepcopy(model)
    runner.adapter.remove_blocks(without4, [4])
    (i, batches), = candidate_outputs(cache, [4])
    got = torch.cat([h for _, h in batches])
    torch.testing.assert_close(got, _block_inputs(without4, ids)[-1], rtol=1e-6, atol=1e-6)

    runner.remove(4)
    runner.remove(1)
    cache.block_removed(1)
    want = _block_inputs(model, ids)
    assert len(cache.states) == len(want) == 5
    for state, ref in zip(cache.states, want):
        torch.testing.assert_close(state.data, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cache.final.data, _block_inputs(tiny_model("gemma4_text", 256), ids)[-1])


def test_gemma4_fusion_fuses_what_matches_and_lists_the_rest():
    """A sliding reader (no k/v projections, 16-wide heads) fused into a full-attention neighbour (32-wide heads):
    its MLP and per-layer input linears are fused, its q/o projections are dropped and said; at init the model
    is the pruned one."""
    from fusedeploy.compress import FusedLinear, load_recipe
    from fusedeploy.compress.distill import REPAIRS, attach_fusion

    model = tiny_model("gemma4_text", 256).requires_grad_(False)
    adapter = ADAPTERS["gemma4_text"]
    runner = _gemma4_runner(model, 24)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pruned = tiny_model("gemma4_text", 256)
        adapter.remove_blocks(pruned, [4])
        want = pruned(ids, use_cache=False).logits
    dropped = attach_fusion(runner, 3, 5, 4, REPAIRS["fusion"], load_recipe("quick", {"group_size": 1}))
    assert dropped == ["self_attn.o_proj", "self_attn.q_proj"]
    terms = {n: m._n_terms for n, m in adapter.blocks(model)[3].named_modules() if isinstance(m, FusedLinear)}
    assert terms == {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 0,
                     "mlp.gate_proj": 1, "mlp.up_proj": 1, "mlp.down_proj": 1,
                     "per_layer_input_gate": 1, "per_layer_projection": 1}
    runner.remove(4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


def test_gemma4_quick_compress_reloads_with_stock_transformers(tokenizer, tmp_path, run_cli, capsys, monkeypatch):
    """`fusedeploy compress --recipe quick` removes 2 of 6 blocks (never one whose K/V others read); the output
    reloads with stock transformers and computes the in-memory compressed model's logits."""
    from transformers import AutoModelForCausalLM

    from fusedeploy.compress import driver

    save(tiny_model("gemma4_text", len(tokenizer)), tokenizer, tmp_path / "g4")
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT.read_text(encoding="utf-8")[:40000])
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(2))
    in_memory = {}
    write = driver.write_output

    def keep_logits(model, *args, **kwargs):
        with torch.no_grad():
            in_memory["logits"] = model(input_ids=ids, use_cache=False).logits
        return write(model, *args, **kwargs)

    monkeypatch.setattr(driver, "write_output", keep_logits)
    capsys.readouterr()  # (the save's progress bar)
    code, out, err = run_cli("compress", "--model", tmp_path / "g4", "--sparsity", "0.3", "--calib", calib,
                             "--out", tmp_path / "out", "--recipe", "quick")
    assert code == 0, err
    text = (tmp_path / "out" / "compression.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"compression.json holds {name}: not JSON"))
    assert len(report["removed_blocks"]) == 2 and not {2, 3} & set(report["removed_blocks"])
    # the blocks whose K/V later blocks read score +inf, recorded as null
    assert [s is None for s in report["iterations"][0]["mi_scores"]][2:4] == [True, True]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    types = tiny_config("gemma4_text", 8).layer_types
    config = reloaded.config
    assert config.num_hidden_layers == 4 and config.layer_types == [types[i] for i in report["kept_blocks"]]
    assert config.num_kv_shared_layers == sum(1 for i in report["kept_blocks"] if i >= 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, in_memory["logits"],
                                   rtol=0, atol=0)


def test_gemma4_moe_compress_is_refused():
    """Routed experts cannot be fused into a neighbour's (as Mistral 4); the dense variant is not refused."""
    adapter = ADAPTERS["gemma4_text"]
    moe = tiny_config("gemma4_text", 64, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    assert "routed experts" in adapter.refusal(moe, "compress")
    assert adapter.refusal(tiny_config("gemma4_text", 64), "compress") is None


def test_gemma4_gguf_and_onnx_are_refused_in_one_line_before_any_work(tokenizer, tmp_path):
    folder = save(tiny_model("gemma4_text", len(tokenizer)), tokenizer, tmp_path / "g4", remove=(1, 4))
    with pytest.raises(UserError, match=r"cannot export Gemma 4 \(gemma4_text\) to GGUF: not supported yet: "
                                        r"llama.cpp's converter writes Gemma4ForCausalLM .* 0.4-1.4% relative") as err:
        export_gguf(folder, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()
    with pytest.raises(UserError, match=r"cannot export Gemma 4 \(gemma4_text\) to ONNX: not supported: .* neither "
                                        r"per-layer input embeddings nor K/V shared between blocks") as err:
        export_onnx(folder, tmp_path / "onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "onnx").exists()
