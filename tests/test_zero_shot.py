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
    assert r["metric"] == "acc_norm" and r["retention"] == pytest.approx(0.8)
    assert r["retention_acc"] == pytest.approx(0.8)
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


# ---------------------------------------------------------------- a build


@pytest.fixture(scope="module")
def zs_build(smol_tokenizer, tmp_path_factory):
    from fusedeploy.models.loading import save_tokenizer

    root = tmp_path_factory.mktemp("zeroshot")
    model = root / "model"
    _sharp(tiny_model("llama", len(smol_tokenizer))).save_pretrained(model)
    save_tokenizer(smol_tokenizer, model)
    opts = BuildOptions.quick(profile="edge-8gb", model=str(model), out=str(root / "b"), sparsity=0.34,
                              calib="builtin", zero_shot=str(DATA), zero_shot_items=ITEMS)
    return opts, build(opts), root / "b"


def test_retention_is_in_report_json_with_both_accuracies_their_ses_and_what_was_scored(zs_build):
    opts, report, out = zs_build
    z = report["zero_shot"]
    detail = json.loads((out / "zeroshot" / "zeroshot.json").read_text())
    indices = zs.subset_indices(30, ITEMS, seed=0)
    items = zs.load_items(DATA)
    assert detail["indices"] == indices
    assert z["subset"] == {"n": ITEMS, "requested": ITEMS, "seed": 0, "selection": zs.SELECTION,
                           "items_digest": zs.items_digest([items[i] for i in indices])}
    # both models scored exactly the subset: the digests are of the items lm-eval handed back
    assert z["dense"]["items_digest"] == z["compressed"]["items_digest"] == z["subset"]["items_digest"]
    assert z["data"]["items_in_file"] == 30 and z["data"]["path"] == str(DATA.resolve())
    per = detail["per_item"]
    assert per["dense"] != per["compressed"], "the compressed model should answer some items differently"
    for side in ("dense", "compressed"):
        for metric in ("acc", "acc_norm"):
            p = sum(per[side][metric]) / ITEMS
            assert z[side][metric] == pytest.approx(p) and z[side]["n"] == ITEMS
            assert z[side][f"{metric}_se"] == pytest.approx(math.sqrt(p * (1 - p) / ITEMS))
    assert z["metric"] == "acc_norm"
    assert z["retention"] == pytest.approx(z["compressed"]["acc_norm"] / z["dense"]["acc_norm"])
    assert z["retention_se"] == pytest.approx(zs.retention_se(per["dense"]["acc_norm"], per["compressed"]["acc_norm"]))
    # which model and runtime: the deployed artifact and its dense peer, each served in llama.cpp
    assert z["artifact_scored"] is True and z["deployed_artifact"] == report["signoff"]["artifact"]
    assert z["compressed"]["scored"] == "deployed artifact compressed-gguf-f16 in llama.cpp"
    assert z["dense"]["scored"] == "dense artifact dense-gguf-f16 in llama.cpp"
    assert z["compressed"]["model"] == "export/compressed-gguf-f16.gguf"
    assert z["dense"]["model"] == "export/dense-gguf-f16.gguf"
    assert z["compressed"]["runtime"] == "llama.cpp f16, through fusedeploy serve (lm-eval local-completions)"
    assert "compression's effect at the deployed precision" in z["note"]
    assert z["se_target"] == 0.015 and z["se_target_met"] is False  # 20 items cannot reach 1.5 points
    assert "min_zero_shot_retention" not in report["signoff"]["budgets"]  # reported, budgeted only when asked
    md = (out / "report" / "report.md").read_text()
    assert f"| retention | compressed / dense, acc_norm | {ITEMS} |" in md and "seed 0" in md
    assert "| compressed | deployed artifact compressed-gguf-f16 in llama.cpp |" in md
    assert "deployed artifact compressed-gguf-f16 in llama.cpp" in (out / "report" / "report.html").read_text()


def test_the_runtime_scores_each_ending_as_pytorch_does_within_verifys_tolerance(zs_build, smol_tokenizer):
    """The dense f16 GGUF's log-likelihoods, served, against lm-eval's `hf` model on its fp32 checkpoint."""
    from fusedeploy.formats import TOLERANCES
    from fusedeploy.models.loading import load_model

    opts, _, out = zs_build
    detail = json.loads((out / "zeroshot" / "zeroshot.json").read_text())
    items = [zs.load_items(DATA)[i] for i in detail["indices"]]
    model, tok, _ = load_model(opts.model, device="cpu", dtype="float32")
    reference = zs.score(model, tok, items)["loglikelihoods"]
    per_token = TOLERANCES["half"]["mean_abs_diff"]
    for item, served, want in zip(items, detail["per_item"]["dense"]["loglikelihoods"], reference):
        for choice, got, expected in zip(item["choices"], served, want):
            n = len(tok(item["query"] + " " + choice)["input_ids"]) - len(tok(item["query"])["input_ids"])
            assert got == pytest.approx(expected, abs=per_token * n), (item["query"], choice)


def _report_with_budget(out, budget: float) -> dict:
    """The report stage run again on the finished build with `budget` as min_zero_shot_retention."""
    manifest = json.loads((out / "report" / "manifest.json").read_text())
    profile = manifest["settings"]["profile"]
    profile = {**profile, "budgets": {**profile["budgets"], "min_zero_shot_retention": budget}}
    earlier = {n: json.loads((out / n / "manifest.json").read_text()) for n in report_stage.INPUTS
               if (out / n / "manifest.json").is_file()}
    stages.run_declared(out, report_stage, report_stage.Config(profile, manifest["settings"]["settings"]), earlier)
    return json.loads((out / "report" / "report.json").read_text())


def test_the_builds_retention_is_what_the_signoff_judges(zs_build, tmp_path):
    """The report stage run again with the budget at the build's own figure (PASS) and at 1.0."""
    _, report, finished = zs_build
    out = tmp_path / "b"
    shutil.copytree(finished, out)
    r = report["zero_shot"]["retention"]
    assert r > 0, "the compressed tiny model answered none right: no budget can pass"

    at = min(1.0, r)
    passed = _report_with_budget(out, at)
    check = passed["signoff"]["budgets"]["min_zero_shot_retention"]
    assert check["result"] == "PASS" and check["figure"] == pytest.approx(r) and check["op"] == ">="
    assert check["basis"] == "measured" and check["n"] == ITEMS and "deployed artifact" in check["note"]
    md = (out / "report" / "report.md").read_text()
    assert f"| min_zero_shot_retention | {r:.3f} | measured | >= {at:g} | PASS |" in md

    full = _report_with_budget(out, 1.0)["signoff"]["budgets"]["min_zero_shot_retention"]
    assert full["result"] == ("PASS" if r >= 1 else "FAIL")


def _signed(budget: float, dense: list[float], compressed: list[float]) -> tuple[dict, dict]:
    """The sample report (a tiny build's) with a zero-shot record from these per-item answers, signed off."""
    from fusedeploy.profiling.report import signoff

    report = json.loads((REPO / "tests" / "data" / "sample-report.json").read_text())
    per = {name: {"acc": a, "acc_norm": a, "items_digest": "d"} for name, a in (("dense", dense),
                                                                                 ("compressed", compressed))}
    z = {**report["zero_shot"], **zs.retention(per["dense"], per["compressed"])}
    for name in ("dense", "compressed"):
        z[name] = {**z[name], **zs.summary(per[name])}
    z["subset"] = {**z["subset"], "n": len(dense)}
    report["zero_shot"] = z
    report["profile"]["budgets"]["min_zero_shot_retention"] = budget
    deployed = next(a for a in report["artifacts"] if a["name"] == report["signoff"]["artifact"])
    dense_artifact = next(a for a in report["artifacts"] if a["variant"] == "dense")
    report["signoff"] = signoff(report["profile"], deployed, [a["verify"] for a in report["artifacts"]],
                                dense=dense_artifact, zero_shot=z)
    return report, report["signoff"]["budgets"]["min_zero_shot_retention"]


def test_the_retention_budget_passes_and_fails_the_signoff(tmp_path):
    from fusedeploy.profiling.report import write_report

    dense, compressed = [1.0] * 50 + [0.0] * 50, [1.0] * 40 + [0.0] * 60  # retention 0.8
    report, check = _signed(0.75, dense, compressed)
    assert check["result"] == "PASS" and check["figure"] == pytest.approx(0.8) and report["signoff"]["result"] == "PASS"
    assert check["se"] == pytest.approx(math.sqrt(0.08 / 100) / 0.5) and check["n"] == 100

    report, check = _signed(0.9, dense, compressed)
    assert check["result"] == "FAIL" and report["signoff"]["result"] == "FAIL"
    assert check["reason"] == "zero-shot acc_norm fell from 0.500 (dense) to 0.400, retention 0.800 +/- 0.057 under 0.9"
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| min_zero_shot_retention | 0.800 | measured | >= 0.9 | FAIL |" in md
    assert "| retention | compressed / dense, acc_norm | 100 |  | 0.8000 +/- 0.0566 |" in md
    assert "min_zero_shot_retention" in (tmp_path / "report.html").read_text()

    _, check = _signed(0.5, dense, [0.0] * 100)  # the compressed model answers nothing: 0, judged, not skipped
    assert check["result"] == "FAIL" and check["figure"] == 0
    _, check = _signed(0.5, [0.0] * 100, [0.0] * 100)  # dense answers nothing either: no ratio, a FAIL that says so
    assert check["result"] == "FAIL" and math.isnan(check["figure"]) and "not a finite number" in check["reason"]


def test_the_stage_is_keyed_on_the_datas_content_the_size_and_seed(zs_build, tmp_path, run_cli):
    opts, report, finished = zs_build
    out = tmp_path / "b"
    shutil.copytree(finished, out)
    copy = tmp_path / "same.jsonl"
    shutil.copy(DATA, copy)  # the same content under another name: nothing to redo
    code, stdout, err = run_cli("build", "--profile", "edge-8gb", "--model", opts.model, "--out", out, "--recipe",
                                "quick", "--sparsity", "0.34", "--calib", "builtin", "--zero-shot", copy,
                                "--zero-shot-items", str(ITEMS))
    again = json.loads((out / "report" / "report.json").read_text())
    assert again["stages"]["zeroshot"]["skipped"]
    assert again["zero_shot"]["retention"] == report["zero_shot"]["retention"]
    z = again["zero_shot"]
    assert (f"zero-shot acc_norm: dense {z['dense']['acc_norm']:.4f}, compressed {z['compressed']['acc_norm']:.4f}"
            in " ".join(err.split())), err
    assert "scored: deployed artifact compressed-gguf-f16 in llama.cpp" in " ".join(err.split())

    fewer = build(BuildOptions.quick(**{**opts.__dict__, "recipe": "quick", "out": str(out), "zero_shot": str(copy),
                                        "zero_shot_items": 8}))
    assert not fewer["stages"]["zeroshot"]["skipped"] and fewer["zero_shot"]["subset"]["n"] == 8
    assert all(fewer["stages"][s]["skipped"] for s in ("compress", "export", "verify", "profile"))
    assert fewer["zero_shot"]["dense"]["items_digest"] == fewer["zero_shot"]["compressed"]["items_digest"]

    lines = copy.read_text().splitlines()
    copy.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same items in another order: another subset
    moved = build(BuildOptions.quick(**{**opts.__dict__, "recipe": "quick", "out": str(out), "zero_shot": str(copy),
                                        "zero_shot_items": 8}))
    assert not moved["stages"]["zeroshot"]["skipped"]
    assert moved["zero_shot"]["subset"]["items_digest"] != fewer["zero_shot"]["subset"]["items_digest"]


# ---------------------------------------------------------------- preflight


@pytest.mark.parametrize("extra, match", [
    (("--min-zero-shot-retention", "0.9"), "add --zero-shot"),
    (("--zero-shot-items", "50"), "no --zero-shot data"),
    (("--zero-shot", str(DATA), "--zero-shot-items", "0"), "at least 1"),
    (("--zero-shot", str(DATA), "--min-zero-shot-retention", "1.5"), "in (0, 1]"),
])
def test_zero_shot_mistakes_stop_the_build_in_one_line(run_cli, tiny_model_dir, tmp_path, extra, match):
    code, out, err = run_cli("build", "--profile", "edge-8gb", "--model", tiny_model_dir("llama"), "--recipe", "quick",
                             "--out", tmp_path / "b", *extra)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert not (tmp_path / "b").exists()


def test_a_profile_retention_budget_without_data_is_one_line(run_cli, tiny_model_dir, tmp_path):
    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "edge-8gb.yaml").read_text())
    profile["budgets"]["min_zero_shot_retention"] = 0.9
    profile["zero_shot"] = {"items": 500, "seed": 3}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    code, _, err = run_cli("build", "--profile", path, "--model", tiny_model_dir("llama"), "--out", tmp_path / "b")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "budgets.min_zero_shot_retention" in lines[0] and "--zero-shot" in lines[0]


def test_the_profile_sets_the_subset_and_the_flag_overrides_its_size(tiny_model_dir, tmp_path):
    import yaml

    from fusedeploy.pipeline.flow import _preflight

    profile = yaml.safe_load((REPO / "profiles" / "edge-8gb.yaml").read_text())
    profile["zero_shot"] = {"items": 500, "seed": 3}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    model = str(tiny_model_dir("llama"))
    base = dict(model=model, out=str(tmp_path / "b"), zero_shot=str(DATA))
    assert _preflight(BuildOptions.quick(profile=str(path), **base)).zero_shot == zs.Subset(str(DATA), 500, 3)
    assert _preflight(BuildOptions.quick(profile=str(path), zero_shot_items=7, **base)).zero_shot.items == 7
    assert _preflight(BuildOptions.quick(profile="edge-8gb", **base)).zero_shot == zs.Subset(str(DATA), 1112, 0)


def test_the_help_states_the_default_size(run_cli):
    code, out, _ = run_cli("build", "--help")
    assert code == 0 and f"else {zs.DEFAULT_ITEMS}:" in " ".join(out.replace("│", " ").split())
