"""Task accuracy through lm-eval on a task file the test writes itself (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fusedeploy.errors import UserError
from fusedeploy.evaluate.tasks import task_accuracy
from fusedeploy.models.loading import load_tokenizer, resolve_model
from .tiny import tiny_model

DOCS = [
    {"query": "The sky is", "choices": [" blue", " a table", " seven", " running"], "label": 0},
    {"query": "Two plus two is", "choices": [" four", " green", " under", " the"], "label": 0},
    {"query": "Water is", "choices": [" dry", " wet", " loud", " square"], "label": 1},
    {"query": "A cat says", "choices": [" moo", " quack", " meow", " hello"], "label": 2},
    {"query": "The sun rises in the", "choices": [" west", " north", " south", " east"], "label": 3},
    {"query": "Fire is", "choices": [" hot", " cold", " blue", " soft"], "label": 0},
]
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("smollm2-135m"))


def _write_task(folder, docs=DOCS, task=TASK):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny.yaml").write_text(task)
    return folder / "tiny.yaml"


@torch.no_grad()
def _expected_accuracy(model, tok, docs):
    """Pick the choice with the highest summed log-probability of its tokens after the query."""
    right = 0
    for d in docs:
        q = tok(d["query"], add_special_tokens=False)["input_ids"]
        best = []
        for c in d["choices"]:
            ids = tok(d["query"] + c, add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            best.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(q), len(ids))))
        right += int(max(range(len(best)), key=best.__getitem__) == d["label"])
    return right / len(docs)


def test_accuracy_matches_a_direct_computation(tok, tmp_path):
    model = tiny_model("llama", len(tok))
    got = task_accuracy(model, tok, _write_task(tmp_path / "task"), batch_size=2)
    assert set(got) == {"tiny_choice"} and got["tiny_choice"]["n"] == len(DOCS)
    assert got["tiny_choice"]["acc"] == pytest.approx(_expected_accuracy(model, tok, DOCS))


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.yaml", "not found"),
    (lambda d: (d.mkdir(), d)[1], "no task .yaml"),
    (lambda d: _write_task(d, task="task: [unclosed"), "cannot read task file"),
    (lambda d: _write_task(d, task="- just\n- a list\n"), "not an lm-eval task"),
    (lambda d: _write_task(d, task=TASK.replace("data.jsonl", "absent.jsonl")), "not found"),
    (lambda d: _write_task(d, task=TASK.replace("dataset_path: json", "dataset_path: hellaswag")), "local data"),
])
def test_bad_task_files_are_one_line(make, match, tok, tmp_path):
    with pytest.raises(UserError, match=match):
        task_accuracy(None, tok, make(tmp_path / "t"))
