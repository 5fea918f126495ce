"""Every adapter removes blocks so that stock transformers saves and reloads the result unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for, supported_architectures
from .tiny import tiny_config, tiny_model

from .conftest import TINY_TYPES


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_remove_blocks_round_trips_through_stock_transformers(model_type, tmp_path):
    model = tiny_model(model_type, vocab_size=512)
    adapter = adapter_for(model)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    kept = adapter.remove_blocks(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after), "removing blocks must change the function"

    blocks = adapter.blocks(model)
    assert len(blocks) == 4 and model.config.num_hidden_layers == 4
    # every module of a block that knows its index (attention, linear attention) has the new one
    assert [sorted({m.layer_idx for m in b.modules() if hasattr(m, "layer_idx")}) for b in blocks] == [[0], [1], [2], [3]]

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(adapter.blocks(reloaded)) == 4
    with torch.no_grad():
        again = reloaded(ids).logits
    torch.testing.assert_close(again, after, rtol=0, atol=0)


def test_gemma3_layer_types_follow_the_kept_blocks():
    model = tiny_model("gemma3_text", vocab_size=256)
    original = list(model.config.layer_types)
    adapter_for(model).remove_blocks(model, [0, 5])
    assert model.config.layer_types == original[1:5]
    assert [b.self_attn.layer_type for b in adapter_for(model).blocks(model)] == original[1:5]


def test_qwen35_hybrid_layer_types_and_cache_follow_the_kept_blocks():
    """Removing blocks 1 and 4 of [lin, full, lin, full, lin, full] keeps [lin, lin, full, full], cache included."""
    from transformers import DynamicCache

    model = tiny_model("qwen3_5_text", vocab_size=256)
    adapter = adapter_for(model)
    original = list(model.config.layer_types)
    adapter.remove_blocks(model, [1, 4])
    assert model.config.layer_types == [original[i] for i in (0, 2, 3, 5)] == \
        ["linear_attention", "linear_attention", "full_attention", "full_attention"]
    assert [adapter.block_kind(b) for b in adapter.blocks(model)] == model.config.layer_types
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a cached decode (one cache layer of each block's kind) equals the full forward
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], cache=cache, use_cache=True)
        step = torch.cat([model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(6, 10)], 1)
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-4, atol=1e-4)


def test_qwen2_max_window_layers_counts_kept_leading_blocks():
    model = tiny_model("qwen2", vocab_size=256, max_window_layers=3)
    adapter_for(model).remove_blocks(model, [0, 4])
    assert model.config.max_window_layers == 2  # blocks 1 and 2 stay below the old limit


def test_remove_blocks_rejects_bad_indices():
    model = tiny_model("llama", vocab_size=128)
    adapter = adapter_for(model)
    with pytest.raises(IndexError):
        adapter.remove_blocks(model, [6])
    with pytest.raises(ValueError):
        adapter.remove_blocks(model, range(6))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2'; supported: .*llama"):
        adapter_for(GPT2Config())
    assert set(TINY_TYPES) <= set(supported_architectures())


def test_linear_names_resolve_in_every_family():
    for model_type in TINY_TYPES:
        model = tiny_model(model_type, vocab_size=64)
        adapter = adapter_for(model)
        seen = set()
        for block in adapter.blocks(model):
            linears = adapter.block_linears(block)
            assert all(isinstance(m, torch.nn.Linear) for m in linears.values())
            assert {f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")} <= set(linears)
            # every linear layer of the block is named (a missed one would be neither fused nor folded)
            assert set(linears) == {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
            seen |= set(linears)
        assert seen == set(adapter.linear_names())
        # hybrid: both mixers' linears; Gemma 4: also each block's per-layer input gate and projection
        assert len(seen) == {"qwen3_5_text": 12, "gemma4_text": 9}.get(model_type, 7)
        assert tiny_config(model_type, 64).model_type == model_type


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_adapter_logits_are_the_models_own(model_type):
    """`adapter.logits` (final norm, LM head, Gemma's soft-cap) reproduces the model's forward exactly."""
    overrides = {"final_logit_softcapping": 2.0} if model_type in ("gemma3_text", "gemma4_text") else {}
    model = tiny_model(model_type, vocab_size=128, **overrides)
    adapter = adapter_for(model)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = adapter.final_norm(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        want = model(ids).logits
        got = adapter.logits(model, seen[0])
    hook.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if overrides:  # the cap is applied: no logit beyond it, and without it the logits differ
        assert adapter.logit_softcap(model.config) == 2.0 and want.abs().max() <= 2.0
        assert not torch.equal(model.get_output_embeddings()(adapter.final_norm(model)(seen[0])), want)
    else:
        assert adapter.logit_softcap(model.config) is None


def test_head_dim_and_kv_heads_come_from_the_adapter():
    assert adapter_for(tiny_config("qwen3", 64, head_dim=32)).head_dim(tiny_config("qwen3", 64, head_dim=32)) == 32
    llama = tiny_config("llama", 64)
    assert adapter_for(llama).head_dim(llama) == 64 // 4 and adapter_for(llama).kv_heads(llama) == 2
