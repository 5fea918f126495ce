"""Text sources and seeded sampling."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fusedeploy.data import eval_windows, load_text, sample_sequences, tokenize
from fusedeploy.errors import UserError

from .conftest import SAMPLE_TEXT


def test_sampling_is_deterministic_for_a_seed():
    ids = torch.arange(10_000)
    a = sample_sequences(ids, 8, 64, seed=3)
    b = sample_sequences(ids, 8, 64, seed=3)
    c = sample_sequences(ids, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # each sample is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))


def test_eval_windows_are_consecutive_and_capped():
    ids = torch.arange(1000)
    w = eval_windows(ids, 100)
    assert w.shape == (10, 100) and torch.equal(w.flatten(), ids)
    assert eval_windows(ids, 100, max_windows=3).shape == (3, 100)
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.arange(50), 100)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(UserError, match="too few calibration tokens"):
        sample_sequences(torch.arange(100), 4, 2048, seed=0)


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    assert load_text(str(tmp_path / "a.txt")) == "first file"
    assert load_text(str(tmp_path)) == "first file\n\nsecond file"
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in ["x y", "z"]))
    assert load_text(str(jl), text_field="body") == "x y\n\nz"
    with pytest.raises(UserError, match="no field 'text'"):
        load_text(str(jl))
    with pytest.raises(UserError, match="text source not found"):
        load_text(str(tmp_path / "nope.txt"))


def test_builtin_corpus_is_real_text_large_enough_to_calibrate(smol_tokenizer):
    text = load_text("builtin")
    ids = tokenize(smol_tokenizer, text)
    assert ids.numel() > 100_000
    assert "the" in text.split()


def test_tokenize_adds_no_special_tokens(smol_tokenizer):
    text = SAMPLE_TEXT.read_text()[:2000]
    ids = tokenize(smol_tokenizer, text)
    assert ids[0].item() != smol_tokenizer.bos_token_id
    assert smol_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def test_dataset_name_offline_is_one_clear_error():
    """Offline as a user sets it, before the process starts: the Hub and datasets libraries read the
    variables when first imported, so setting them inside this test process would test their network
    retries (about 20 s), not the offline path."""
    code = ("from fusedeploy.data import load_text\nfrom fusedeploy.errors import UserError\n"
            "try:\n    load_text('wikitext2')\nexcept UserError as exc:\n    print(exc)\n    raise SystemExit(3)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(r"cannot load dataset 'wikitext2'.*local \.txt file", proc.stdout), proc.stdout


def test_calibration_and_evaluation_parts_share_no_token_window():
    from fusedeploy.data import eval_windows, load_text, sample_sequences, text_part, tokenize
    from fusedeploy.models.loading import load_tokenizer, resolve_model

    text = load_text("builtin")
    calib, ev = text_part(text, "calib"), text_part(text, "eval")
    assert calib + ev == text and calib.endswith("\n") and 0.75 < len(calib) / len(text) < 0.85
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    c_ids, e_ids = tokenize(tok, calib), tokenize(tok, ev)
    windows = eval_windows(e_ids, 64, 20)
    samples = sample_sequences(c_ids, 200, 64, seed=0)
    calib_windows = {tuple(w.tolist()) for w in samples}
    assert not any(tuple(w.tolist()) in calib_windows for w in windows)
    # every calibration sample lies inside the calibration part's tokens, every evaluation window in the other
    stream = c_ids.tolist()
    assert all(any(stream[i:i + 64] == w.tolist() for i in range(len(stream) - 63)) for w in samples[:5])
    from fusedeploy.data.split import describe

    c, e = describe(text, "calib")["chars"], describe(text, "eval")["chars"]
    assert c[1] == e[0] and c[0] == 0 and e[1] == len(text)  # disjoint character ranges that cover the text
    assert text_part(text, "calib") == calib  # deterministic
