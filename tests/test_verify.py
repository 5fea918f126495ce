"""verify_artifact and `fusedeploy eval --runtime` on real runtimes with tiny models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from exporters.gguf import export_gguf
from exporters.onnx import export_onnx
from exporters.verify import verify_artifact
from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.cli import app
from fusedeploy.errors import UserError
from fusedeploy.models.loading import resolve_model, save_tokenizer

from .tiny import tiny_model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).location)
    root = tmp_path_factory.mktemp("verify")
    for name, seed in (("ref", 0), ("other", 1)):
        tiny_model("llama", len(tok), seed=seed).save_pretrained(root / name)
        save_tokenizer(tok, root / name)
    return {
        "ref": root / "ref", "other": root / "other",
        "f32": export_gguf(root / "ref", root / "m-f32.gguf", "f32"),
        "q8_0": export_gguf(root / "ref", root / "m-q8_0.gguf", "q8_0"),
        "onnx": export_onnx(root / "ref", root / "onnx"),
    }


@pytest.mark.parametrize("kind", ["f32", "q8_0", "onnx"])
def test_verify_passes_against_its_own_reference(artifacts, kind):
    result = verify_artifact(artifacts[kind], str(artifacts["ref"]), "builtin", ctx=64, max_windows=2)
    assert result.passed, result.failures
    assert result.precision == {"f32": "fp32", "q8_0": "8bit", "onnx": "fp32"}[kind]
    d = result.to_dict()
    assert d["passed"] and d["windows"] == 2 and d["ctx"] == 64
    assert abs(d["ppl_ratio"] - 1) < 0.03


def test_verify_fails_against_another_model(artifacts):
    result = verify_artifact(artifacts["f32"], str(artifacts["other"]), "builtin", ctx=64, max_windows=1)
    assert not result.passed and result.failures


def test_verify_missing_artifact(artifacts, tmp_path):
    with pytest.raises(UserError, match="not found"):
        verify_artifact(tmp_path / "nope.gguf", str(artifacts["ref"]))


def test_cli_verify_and_eval_runtimes(artifacts):
    runner = CliRunner()
    res = runner.invoke(app, ["verify", str(artifacts["f32"]), "--reference", str(artifacts["ref"]),
                              "--ctx", "64", "--max-windows", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["passed"] is True
    ppl = {}
    for runtime, model in (("pytorch", artifacts["ref"]), ("llama.cpp", artifacts["f32"]),
                           ("onnxruntime", artifacts["onnx"])):
        res = runner.invoke(app, ["eval", "--model", str(model), "--runtime", runtime, "--ctx", "64",
                                  "--max-windows", "2", "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout[res.stdout.index("{"):])
        assert out["backend"] == runtime
        ppl[runtime] = out["ppl"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["pytorch"], rel=1e-3)
    assert ppl["onnxruntime"] == pytest.approx(ppl["pytorch"], rel=1e-4)


def test_eval_runtime_names_aliases_and_mismatches(artifacts, run_cli):
    code, out, err = run_cli("eval", "--model", artifacts["f32"], "--runtime", "gguf", "--ctx", 64,
                             "--max-windows", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["backend"] == "llama.cpp"  # the old spelling runs the one runtime, reported by its name
    code, _, err = run_cli("eval", "--model", artifacts["onnx"], "--runtime", "llama.cpp")
    assert code == 2 and "--runtime llama.cpp needs a .gguf file" in err
    code, _, err = run_cli("eval", "--model", artifacts["f32"], "--runtime", "tflite")
    assert code == 2 and "unknown --runtime 'tflite'; choose from auto, pytorch, llama.cpp, onnxruntime" in err
