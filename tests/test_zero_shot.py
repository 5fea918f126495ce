"""Zero-shot retention: the seeded subset, its standard errors, the zeroshot stage, report.json and the sign-off.

The data is tests/data/hellaswag-style.jsonl: 30 items in HellaSwag's format written for this repository.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from fusedeploy.errors import UserError
from fusedeploy.evaluate import zero_shot as zs
from fusedeploy.pipeline import BuildOptions, build
from fusedeploy.pipeline import stages
from fusedeploy.pipeline.stages import report as report_stage

from .conftest import REPO
from .tiny import tiny_model

DATA = REPO / "tests" / "data" / "hellaswag-style.jsonl"
ITEMS = 20  # of the file's 30: a subset, so which items is a real choice


# ---------------------------------------------------------------- the subset and its standard errors


def test_the_subset_is_a_seeded_permutation_of_the_files_items():
    first = zs.subset_indices(30, 12, seed=0)
    assert first == zs.subset_indices(30, 12, seed=0)  # the same items for every caller: dense and compressed
    assert len(set(first)) == 12 and all(0 <= i < 30 for i in first)
    assert zs.subset_indices(30, 20, seed=0)[:12] == first  # a larger subset extends a smaller one
    assert zs.subset_indices(30, 12, seed=1) != first
    assert sorted(zs.subset_indices(30, 100, seed=0)) == list(range(30))  # at most the whole file, each item once
    # sha256 order, no random-number library: pinned, so a library upgrade cannot move the subset
    assert first == [15, 20, 25, 18, 7, 4, 9, 21, 23, 10, 17, 26]


def test_standard_errors_with_known_p_and_n():
    assert zs.standard_error(0.5, 1112) == pytest.approx(math.sqrt(0.25 / 1112))
    assert zs.standard_error(0.5, 1112) <= 0.015 < zs.standard_error(0.5, 1111)  # 1112: the fewest for 1.5 points
    assert zs.DEFAULT_ITEMS == zs.items_for_se(0.015, 0.5) == 1112
    assert zs.items_for_se(0.015, 0.4) == 1067  # p = 0.4 needs fewer; the default covers any p
    assert zs.standard_error(0.25, 100) == pytest.approx(0.0433012702)
    s = zs.summary({"acc": [1.0, 0.0, 0.0, 0.0] * 25, "acc_norm": [1.0, 1.0, 0.0, 0.0] * 25, "items_digest": "d"})
    assert s["n"] == 100 and s["acc"] == 0.25 and s["acc_norm"] == 0.5
    assert s["acc_se"] == pytest.approx(0.0433012702) and s["acc_norm_se"] == pytest.approx(0.05)


def test_retention_and_its_paired_standard_error():
    dense = [1.0] * 50 + [0.0] * 50  # 0.5
    compressed = [1.0] * 40 + [0.0] * 60  # 0.4, right only where dense was right
    r = zs.retention({"acc": dense, "acc_norm": dense}, {"acc": compressed, "acc_norm": compressed})
    assert r["metric"] == "acc_norm" and r["retention"] == pytest.approx(0.8) and r["retention_acc"] == pytest.approx(0.8)
    # e_i = c_i - 0.8 d_i: 40 x 0.2, 10 x -0.8, 50 x 0 -> Var(e) = 0.08; SE = sqrt(0.08 / 100) / 0.5
    assert r["retention_se"] == pytest.approx(math.sqrt(0.08 / 100) / 0.5)
    assert zs.retention_se(dense, dense) == 0  # the same answers: no sampling noise in the ratio
    assert math.isnan(zs.retention_se([0.0] * 4, [1.0] * 4))


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ('{"query": "A", "choices": ["a", "b", "c", "d"], "label": 0}\n{"query": \n', "line 2: not valid JSON"),
    ('[1, 2]\n', "not an object"),
    ('{"query": "A", "choices": ["a", "b", "c"], "label": 0}\n', "list of 4 strings"),
    ('{"query": "A", "choices": ["a", "b", "c", "d"], "label": 4}\n', "`label` must be"),
    ('{"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 1}\n', "no `query`"),
])
def test_a_bad_data_file_is_one_line(tmp_path, content, match):
    path = tmp_path / "hs.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        zs.load_items(path)


def test_labels_as_digit_strings_are_read_as_the_hub_keeps_them(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text('{"query": "A", "choices": ["a", "b", "c", "d"], "label": "2"}\n')
    assert zs.load_items(path)[0]["label"] == 2


def _sharp(model):
    """A random model's next-token distribution is so flat that its answers follow the tokenizer alone, and
    removing blocks changes none of them; a scaled-up output layer makes them depend on the blocks."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@torch.no_grad()
def _direct(model, tok, item) -> tuple[float, float]:
    """acc and acc_norm of one item: each ending after " ", summed log-probability, and per character."""
    q = tok(item["query"], add_special_tokens=False)["input_ids"]
    lls = []
    for c in item["choices"]:
        ids = tok(item["query"] + " " + c, add_special_tokens=False)["input_ids"]
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(q), len(ids))))
    best = max(range(4), key=lls.__getitem__)
    best_norm = max(range(4), key=lambda i: lls[i] / len(item["choices"][i]))
    return float(best == item["label"]), float(best_norm == item["label"])


def test_lm_eval_scores_each_item_as_a_direct_computation(smol_tokenizer):
    model = _sharp(tiny_model("llama", len(smol_tokenizer)))
    items = [zs.load_items(DATA)[i] for i in zs.subset_indices(30, 8, seed=0)]
    got = zs.score(model, smol_tokenizer, items, batch_size=4)
    want = [_direct(model, smol_tokenizer, it) for it in items]
    assert got["acc"] == [a for a, _ in want] and got["acc_norm"] == [n for _, n in want]
    assert got["items_digest"] == zs.items_digest(items)
