"""A quick build on a tiny model produces every artifact and a signed-off report, and resumes after an interruption."""

import json

import pytest

from fusedeploy.pipeline import BuildOptions, build
from fusedeploy.pipeline.stages import export as export_stage


@pytest.fixture(scope="module")
def quick_build(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "b"
    # one text for calibration and evaluation: the build must split it (test_quality_budget_...)
    opts = BuildOptions.quick(profile="edge-8gb", model=str(tiny_model_dir("llama")), out=str(out), sparsity=0.34,
                              calib="builtin")
    return opts, build(opts), out


def test_quick_build_produces_every_artifact_and_a_signoff(quick_build):
    opts, report, out = quick_build
    for stage in ("plan", "compress", "export", "verify", "profile", "report"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete"
    assert {a["name"] for a in report["artifacts"]} == {"compressed-gguf-f16", "dense-gguf-f16"}
    for a in report["artifacts"]:
        assert (out / "export" / a["path"]).is_file() and a["size_bytes"] > 0
        assert a["measured"]["metrics"]["decode_tokens_per_s"]["median"] > 0
        assert a["projected"]["label"] == "projected"
    compressed = json.loads((out / "compress" / "model" / "compression.json").read_text())
    assert len(compressed["removed_blocks"]) == 3  # ceil(6 * 0.34)
    signoff = report["signoff"]
    assert set(signoff["budgets"]) == {"max_memory_gb", "min_decode_tokens_per_s", "max_time_to_first_token_s",
                                       "max_perplexity_ratio"}  # the shipped profile sets a quality budget
    assert all(c["result"] in ("PASS", "FAIL") for c in signoff["budgets"].values())
    expected = all(c["result"] == "PASS" for c in signoff["budgets"].values()) and signoff["verify"]["result"] == "PASS"
    assert signoff["result"] == ("PASS" if expected else "FAIL")
    html = (out / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html
    assert html.count("<table>") == 4 and "|---" not in html and "<pre>" not in html  # budgets, projection, artifacts, plan
    md = (out / "report" / "report.md").read_text()
    assert "sign-off" in md and "Planner candidates" in md and "| chosen |" in md


def test_rerun_skips_finished_stages_and_interrupted_build_resumes(quick_build, monkeypatch):
    opts, _, out = quick_build
    calls = []
    real_export = export_stage.export_artifact
    monkeypatch.setattr(export_stage, "export_artifact", lambda *a: calls.append(a) or real_export(*a))
    build(opts)
    assert calls == []  # nothing changed: every stage skipped

    # interrupt the profile stage of a build with new profiling settings
    from fusedeploy.profiling import measure

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    changed = BuildOptions.quick(**{**opts.__dict__, "recipe": "quick", "new_tokens": 6})
    monkeypatch.setattr(measure, "measure_artifact", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(changed)
    assert (out / "profile" / "manifest.json").is_file()  # the finished older stage is intact
    monkeypatch.undo()
    monkeypatch.setattr(export_stage, "export_artifact", lambda *a: calls.append(a) or real_export(*a))
    report = build(changed)
    assert calls == []  # export was not redone
    assert report["stages"]["export"]["skipped"] and not report["stages"]["profile"]["skipped"]
    assert report["artifacts"][0]["measured"]["new_tokens"] == 6


def test_cli_build_reports_and_exits_by_signoff(run_cli, quick_build):
    opts, report, out = quick_build
    code, stdout, err = run_cli("build", "--profile", "edge-8gb", "--model", opts.model, "--out", out,
                                "--recipe", "quick", "--sparsity", "0.34", "--calib", opts.calib)
    written = json.loads((out / "report" / "report.json").read_text())["signoff"]["result"]
    assert f"sign-off {written}" in stdout
    assert code == (0 if written == "PASS" else 1)
    code, _, err = run_cli("build", "--profile", "edge-99gb")
    assert code == 2 and "unknown profile 'edge-99gb'" in err


def test_an_edited_profile_with_the_same_name_is_not_signed_off_from_stale_stages(run_cli, quick_build, tmp_path,
                                                                                  monkeypatch):
    """New budgets under the same profile name re-run plan, profile and report: stages key on content, not names."""
    import shutil
    from dataclasses import replace

    import yaml

    from fusedeploy.profiling import measure
    from fusedeploy.profiling.schema import profiles_dir

    opts, _, finished = quick_build
    out = tmp_path / "b"
    shutil.copytree(finished, out)
    # the finished build judged decode against the shipped profile's budget (its verdict hangs on this host's speed)
    assert json.loads((out / "report" / "report.json").read_text())["signoff"]["budgets"][
        "min_decode_tokens_per_s"]["budget"] == 15
    old_report_key = json.loads((out / "report" / "manifest.json").read_text())["key"]
    data = yaml.safe_load((profiles_dir() / "edge-8gb.yaml").read_text())
    data["budgets"]["min_decode_tokens_per_s"] = 150
    data["memory_bandwidth_gbps"] = 5.12
    edited = tmp_path / "edge-8gb.yaml"
    edited.write_text(yaml.safe_dump(data))
    assert yaml.safe_load(edited.read_text())["name"] == "edge-8gb"
    # A tiny model decodes so fast that 5.12 GB/s could still pass on a slow host (whose low calibrated
    # bandwidth scales the projection up); pinning the host's figure makes the verdict the profile's.
    real_calibrate = measure.calibrate_host
    monkeypatch.setattr(measure, "calibrate_host",
                        lambda *a, **k: replace(real_calibrate(*a, **k), memory_bandwidth_gbps=200.0))

    code, stdout, err = run_cli("build", "--profile", edited, "--model", opts.model, "--out", out,
                                "--recipe", "quick", "--sparsity", "0.34", "--calib", opts.calib)
    report = json.loads((out / "report" / "report.json").read_text())
    stages = report["stages"]
    assert not stages["plan"]["skipped"] and not stages["profile"]["skipped"]
    assert stages["compress"]["skipped"] and stages["export"]["skipped"] and stages["verify"]["skipped"]
    assert json.loads((out / "report" / "manifest.json").read_text())["key"] != old_report_key
    assert report["profile"]["memory_bandwidth_gbps"] == 5.12
    decode = report["signoff"]["budgets"]["min_decode_tokens_per_s"]
    assert decode["budget"] == 150 and decode["result"] == "FAIL"
    deployed = next(a for a in report["artifacts"] if a["name"] == report["signoff"]["artifact"])
    measured = deployed["measured"]["metrics"]["decode_tokens_per_s"]["median"]
    assert deployed["projected"]["bandwidth_ratio"] == pytest.approx(5.12 / 200.0)
    # decode also reads the KV cache of the profile's 4096-token context (half of it per step, on average)
    from fusedeploy.models.loading import load_config, resolve_model
    from fusedeploy.profiling.planner import ModelShape

    shape = ModelShape.from_config(load_config(resolve_model(opts.model)))
    kv = shape.kv_bytes_per_token(shape.blocks - report["compression"]["deployed_removed_blocks"], "llama.cpp")
    m = deployed["measured"]
    weights = deployed["size_bytes"]
    read_here, read_there = weights + kv * (m["prompt_tokens"] + m["new_tokens"] / 2), weights + kv * 4096 / 2
    assert decode["figure"] == pytest.approx(measured * 5.12 / 200.0 * read_here / read_there)
    assert report["signoff"]["result"] == "FAIL" and code == 1
    assert "sign-off FAIL" in stdout and ">= 150 (projected)  [FAIL]" in err


def test_quality_budget_is_judged_on_held_out_text(quick_build):
    """The perplexity ratio compressed/dense, measured in the runtime on text calibration never read."""
    opts, report, out = quick_build
    q = report["signoff"]["budgets"]["max_perplexity_ratio"]
    rows = {a["variant"]: a for a in report["artifacts"]}
    ratio = rows["compressed"]["verify"]["ppl_artifact"] / rows["dense"]["verify"]["ppl_artifact"]
    assert q["basis"] == "measured" and q["figure"] == pytest.approx(ratio) and q["budget"] == 2.5
    texts = report["evaluation_text"]  # one source for both: split, and the report says so
    assert texts["calibration"]["part"] == "calib" and texts["evaluation"]["part"] == "eval" and texts["disjoint"]
    compression = json.loads((out / "compress" / "model" / "compression.json").read_text())
    assert compression["calib_part"] == "calib"

    tight = max(1.0, ratio * 0.5)
    if ratio > tight:  # an impossible budget fails the build, and says why
        failed = build(BuildOptions.quick(**{**opts.__dict__, "max_ppl_ratio": tight}))
        fq = failed["signoff"]["budgets"]["max_perplexity_ratio"]
        assert fq["result"] == "FAIL" and failed["signoff"]["result"] == "FAIL" and "dense" in fq["reason"]
        assert "max_perplexity_ratio" in (out / "report" / "report.md").read_text()
    loose = build(BuildOptions.quick(**{**opts.__dict__, "max_ppl_ratio": ratio * 2 + 1}))
    assert loose["signoff"]["budgets"]["max_perplexity_ratio"]["result"] == "PASS"
    with pytest.raises(Exception, match="at least 1"):
        build(BuildOptions.quick(**{**opts.__dict__, "max_ppl_ratio": 0.5}))


def test_task_accuracy_is_reported_and_budgeted(run_cli, quick_build, tmp_path):
    """--eval-tasks runs lm-eval on the dense and the compressed model; the drop is judged and shown."""
    import shutil

    from .test_tasks import _write_task

    opts, _, finished = quick_build
    out = tmp_path / "b"
    shutil.copytree(finished, out)
    task = _write_task(tmp_path / "task")
    args = ("build", "--profile", "edge-8gb", "--model", opts.model, "--out", out, "--recipe", "quick",
            "--sparsity", "0.34", "--calib", opts.calib, "--eval-tasks", task)
    code, stdout, err = run_cli(*args, "--max-accuracy-drop", "1.0")
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["stages"]["compress"]["skipped"] and not report["stages"]["tasks"]["skipped"]
    t = report["task_accuracy"]["tiny_choice"]
    assert t["n"] == 6 and 0 <= t["dense"] <= 1 and 0 <= t["compressed"] <= 1
    assert t["drop"] == pytest.approx(t["dense"] - t["compressed"])
    check = report["signoff"]["budgets"]["max_accuracy_drop"]
    assert check["figure"] == pytest.approx(t["drop"]) and check["result"] == "PASS"
    assert code == (0 if report["signoff"]["result"] == "PASS" else 1)  # the speed budgets hang on this host
    assert "| tiny_choice | acc | 6 |" in (out / "report" / "report.md").read_text()

    # an accuracy budget with no tasks to judge it could only fail: refused before any stage runs
    before = (out / "report" / "report.json").read_bytes()
    code, stdout, err = run_cli(*args[:-2], "--max-accuracy-drop", "0.5")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "--eval-tasks" in err
    assert (out / "report" / "report.json").read_bytes() == before


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.yaml", "not found"),
    (lambda d: (d / "t.yaml", (d / "t.yaml").write_text("task: x\ndataset_path: json\n"))[0], "local data"),
])
def test_a_missing_or_malformed_task_file_stops_the_build_in_one_line(run_cli, tiny_model_dir, tmp_path, make, match):
    code, _, err = run_cli("build", "--profile", "edge-8gb", "--model", tiny_model_dir("llama"), "--recipe", "quick",
                           "--eval-tasks", make(tmp_path), "--out", tmp_path / "b")
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_a_profile_with_a_serving_budget_load_tests_the_deployed_artifact(quick_build, tmp_path):
    """The serving load test is a step of the profile stage; its budget is signed off like the others."""
    import shutil

    import yaml

    from fusedeploy.profiling.schema import profiles_dir

    opts, _, finished = quick_build
    out = tmp_path / "b"
    shutil.copytree(finished, out)
    data = yaml.safe_load((profiles_dir() / "edge-8gb.yaml").read_text())
    data["serving"] = {"concurrency": [1, 2], "duration_s": 1.0, "max_tokens": 4}
    data["budgets"].update(min_serving_tokens_per_s=0.0, serving_concurrency=2)
    served = tmp_path / "served.yaml"
    served.write_text(yaml.safe_dump(data))
    report = build(BuildOptions.quick(**{**opts.__dict__, "recipe": "quick", "profile": str(served), "out": str(out),
                                         "profile_runs": 1}))  # one run: the load test is what is tried here
    stages = report["stages"]
    assert not stages["profile"]["skipped"] and stages["export"]["skipped"]
    serving = report["serving"]
    assert serving["artifact"] == report["signoff"]["artifact"]  # the deployed artifact only
    assert [lv["concurrency"] for lv in serving["measured"]["levels"]] == [1, 2]
    check = report["signoff"]["budgets"]["min_serving_tokens_per_s"]
    assert check["basis"] == "projected" and check["concurrency"] == 2 and check["result"] == "PASS"
    assert check["figure"] == serving["projected"]["levels"][1]["output_tokens_per_s"]
    assert "Serving load test" in (out / "report" / "report.md").read_text()
    assert (out / "profile" / "serve.log").is_file()
