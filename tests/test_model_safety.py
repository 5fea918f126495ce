"""What a model folder may make FuseDeploy do: nothing but be read.

A config.json can ask transformers to fetch code (an attention kernel named by
Hub repository) or to import the folder's own Python (`auto_map`), and weights
can be pickles. Each is refused in one line or read without running anything;
a planted module that writes a file when imported proves nothing ran.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fusedeploy.errors import UserError
from fusedeploy.models.loading import load_model, resolve_model, with_revision

PLANTED = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel
'''


def _copy(tiny_model_dir, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir("llama"), folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("key, value", [
    ("_attn_implementation_internal", "attacker/kernel"),
    ("attn_implementation", "attacker/kernel:v1"),
    ("experts_implementation", "attacker/moe"),
])
def test_a_config_naming_hub_code_is_refused_in_one_line(tiny_model_dir, tmp_path, run_cli, key, value):
    folder = _copy(tiny_model_dir, tmp_path)
    _edit_config(folder, **{key: value})
    code, out, err = run_cli("info", folder)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "names code to fetch from the Hub" in lines[0]
    assert key in lines[0] and "Traceback" not in err


def test_a_hub_code_key_in_a_sub_config_is_found(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    _edit_config(folder, text_config={"_attn_implementation_internal": "attacker/kernel"})
    with pytest.raises(UserError, match=r"text_config\._attn_implementation_internal"):
        resolve_model(str(folder))


def test_builtin_attention_names_are_accepted(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    _edit_config(folder, attn_implementation="sdpa")
    assert resolve_model(str(folder)).location == str(folder.resolve())


def test_auto_map_code_in_the_folder_never_runs(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    marker = tmp_path / "planted-code-ran"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(PLANTED.format(marker=str(marker)))
    _edit_config(folder, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    tok_config = folder / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tok_config.write_text(json.dumps(data))

    model, tokenizer, _ = load_model(str(folder), device="cpu", dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and type(model).__module__.startswith("transformers.")
    with torch.no_grad():
        model(torch.tensor([tokenizer("hello")["input_ids"]]))
    assert not marker.exists(), "code from the model folder ran"


def test_a_folder_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path, run_cli):
    folder = _copy(tiny_model_dir, tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    code, _, err = run_cli("info", folder)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds only pickle weights (pytorch_model.bin)" in lines[0]
    assert "safetensors" in lines[0]
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


def _fake_hub_cache(cache, repo_id, source, revision="main", commit="a" * 40):
    """The Hugging Face cache layout snapshot_download reads offline: refs/<revision> -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_id_resolves_to_its_cache_snapshot_offline(tiny_model_dir, tmp_path, monkeypatch, run_cli):
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "someorg/tiny", tiny_model_dir("llama"))
    _fake_hub_cache(cache, "someorg/tiny", tiny_model_dir("llama"), revision="v2", commit="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert resolve_model("someorg/tiny").location == str(snapshot)
    assert resolve_model("someorg/tiny@v2").location.endswith("b" * 40)
    assert with_revision("someorg/tiny", "v2") == "someorg/tiny@v2"
    with pytest.raises(UserError, match="give one of them"):
        with_revision("someorg/tiny@v1", "v2")
    code, out, err = run_cli("info", "someorg/tiny", "--revision", "v2", "--json")
    assert code == 0, err
    assert json.loads(out)["blocks"] == 6


def test_a_hub_snapshot_is_checked_like_a_local_folder(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "someorg/evil", tiny_model_dir("llama"))
    path = snapshot / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_attn_implementation_internal": "x/y"}))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="names code to fetch from the Hub"):
        resolve_model("someorg/evil")
