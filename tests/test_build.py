"""A quick build on a tiny model produces every artifact and a signed-off report, and resumes after an interruption."""

import json

import pytest

from fusedeploy.pipeline import BuildOptions, build
from fusedeploy.pipeline import flow


@pytest.fixture(scope="module")
def quick_build(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "b"
    opts = BuildOptions.quick(profile="edge-8gb", model=str(tiny_model_dir("llama")), out=str(out), sparsity=0.34)
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
    assert set(signoff["budgets"]) == {"max_memory_gb", "min_decode_tokens_per_s", "max_time_to_first_token_s"}
    assert all(c["result"] in ("PASS", "FAIL") for c in signoff["budgets"].values())
    expected = all(c["result"] == "PASS" for c in signoff["budgets"].values()) and signoff["verify"]["result"] == "PASS"
    assert signoff["result"] == ("PASS" if expected else "FAIL")
    html = (out / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html
    md = (out / "report" / "report.md").read_text()
    assert "sign-off" in md and "Planner candidates" in md and "| chosen |" in md


def test_rerun_skips_finished_stages_and_interrupted_build_resumes(quick_build, monkeypatch):
    opts, _, out = quick_build
    calls = []
    real_export = flow._export
    monkeypatch.setattr(flow, "_export", lambda *a: calls.append(a) or real_export(*a))
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
    monkeypatch.setattr(flow, "_export", lambda *a: calls.append(a) or real_export(*a))
    report = build(changed)
    assert calls == []  # export was not redone
    assert report["stages"]["export"]["skipped"] and not report["stages"]["profile"]["skipped"]
    assert report["artifacts"][0]["measured"]["new_tokens"] == 6


def test_cli_build_reports_and_exits_by_signoff(run_cli, quick_build):
    opts, report, out = quick_build
    code, stdout, err = run_cli("build", "--profile", "edge-8gb", "--model", opts.model, "--out", out,
                                "--recipe", "quick", "--sparsity", "0.34")
    written = json.loads((out / "report" / "report.json").read_text())["signoff"]["result"]
    assert f"sign-off {written}" in stdout
    assert code == (0 if written == "PASS" else 1)
    code, _, err = run_cli("build", "--profile", "edge-99gb")
    assert code == 2 and "unknown profile 'edge-99gb'" in err
