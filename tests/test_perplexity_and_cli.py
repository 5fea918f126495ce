"""`fusedeploy eval` agrees with the model's own loss; the CLI reports user errors in one line."""

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from fusedeploy import __version__
from fusedeploy.data import eval_windows, tokenize

from .conftest import SAMPLE_TEXT


def _independent_ppl(model_dir, text, ctx, max_windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tokenize(tok, text), ctx, max_windows)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses)), len(windows)


def test_eval_ppl_equals_the_models_own_loss(run_cli, tiny_model_dir, tmp_path):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(SAMPLE_TEXT.read_text())
    folder = tiny_model_dir("llama")
    code, out, err = run_cli("eval", "--model", folder, "--data", text_file, "--ctx", 128, "--max-windows", 5, "--json")
    assert code == 0, err
    result = json.loads(out)
    expected, windows = _independent_ppl(folder, text_file.read_text(), 128, 5)
    assert result["windows"] == windows == 5 and result["tokens"] == 5 * 127
    assert math.isclose(result["ppl"], expected, rel_tol=1e-5)


def test_real_model_ppl_is_plausible(run_cli):
    code, out, err = run_cli("eval", "--data", SAMPLE_TEXT, "--ctx", 256, "--max-windows", 2, "--json")
    assert code == 0, err
    assert 10 < json.loads(out)["ppl"] < 80  # dense SmolLM2-135M is ~29 at ctx 512


def test_version_and_info(run_cli, tiny_model_dir):
    assert run_cli("--version")[:2] == (0, f"fusedeploy {__version__}\n")
    code, out, _ = run_cli("info", tiny_model_dir("gemma3_text"), "--json")
    facts = json.loads(out)
    assert code == 0 and facts["blocks"] == 6 and facts["architecture"] == "Gemma 3"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gemma3_text"))
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["bytes_fp16"] == 2 * facts["parameters"]


def _one_line_error(code, out, err, pattern):
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], err
    assert "Traceback" not in err


def test_user_errors_are_one_line(run_cli, tmp_path):
    _one_line_error(*run_cli("eval", "--data", tmp_path / "missing.txt"), "text source not found")
    _one_line_error(*run_cli("info", "not-a-model"), "model not found: 'not-a-model'")
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    _one_line_error(*run_cli("info", tmp_path / "gpt2"), "unsupported architecture 'gpt2'")
    _one_line_error(*run_cli("eval", "--model", tmp_path / "gpt2"), "unsupported architecture 'gpt2'")


def test_usage_errors_exit_2_without_traceback(run_cli):
    code, out, err = run_cli("eval", "--no-such-flag")
    assert code == 2 and "No such option" in err and "Traceback" not in err
    code, _, err = run_cli("eval", "--ctx", "abc")
    assert code == 2 and "Invalid value" in err


def test_a_command_that_exits_1_really_exits_1(run_cli, monkeypatch):
    """`typer.Exit(1)` (a failed verify or sign-off) must reach the shell as status 1."""
    import typer

    from fusedeploy import cli

    @cli.app.command("fail-for-test", hidden=True)
    def _fail() -> None:
        raise typer.Exit(1)

    try:
        code, _, _ = run_cli("fail-for-test")
    finally:
        cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "fail-for-test"]
    assert code == 1
