"""Shared fixtures: the real SmolLM2 (converted once), its tokenizer, tiny models, corpora."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fusedeploy.builtin import DEFAULT_MODEL
from fusedeploy.cli import _quiet_library_progress

_quiet_library_progress()  # fixtures save and load models outside the CLI too; their bars would fill captured stderr

REPO = Path(__file__).resolve().parents[1]
# Text the tests read ships with them (tests/data/README.md says what it is); no test reads
# outside the repository.
SAMPLE_TEXT = REPO / "tests" / "data" / "wikitext-style.txt"
TINY_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "ministral3", "qwen3_5_text", "gemma4_text"]


@pytest.fixture(scope="session")
def smollm2_source():
    from fusedeploy.models.loading import resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_source):
    from fusedeploy.models.loading import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """Factory: a saved tiny random model of a family (made once per family)."""
    from .tiny import save_tiny_model

    made: dict[str, Path] = {}

    def make(model_type: str = "llama") -> Path:
        if model_type not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[model_type] = save_tiny_model(model_type, smol_tokenizer, folder)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> str:
    """The tiny Llama most compression tests share (read-only: runs write elsewhere)."""
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> str:
    """40,000 characters of the built-in text: enough calibration for the tiny models."""
    from fusedeploy.data import load_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(load_text("builtin")[:40000])
    return str(path)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `fusedeploy ARGS` in-process; returns (exit code, stdout, stderr)."""
    from fusedeploy import cli

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["fusedeploy", *map(str, args)])
        cli._state["debug"] = False
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
