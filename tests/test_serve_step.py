"""The serving load test as a build step: the real server on a tiny GGUF, its budget in the sign-off, the profile
fields that configure it and `build --serve-load`."""

from __future__ import annotations

import json
import time

import psutil
import pytest
import yaml

from exporters.gguf import export_gguf
from exporters.llama_server import find_server
from exporters.onnx import export_onnx
from fusedeploy.errors import UserError
from fusedeploy.profiling.measure import HostCalibration
from fusedeploy.profiling.report import _serving_markdown, serving_check, signoff
from fusedeploy.profiling.schema import Serving, load_profile, profiles_dir
from fusedeploy.serve.load_step import serving_step

from .processes import children_where

DURATION = 1.5
GRACE = 1.5  # per level: in-flight requests cut off and connections closed (as in test_serve.py)
HOST = HostCalibration(memory_bandwidth_gbps=10.0, compute_tflops=0.1, cpu="test", cores=2)


def _profile_yaml(tmp_path, serving=None, **budgets):
    data = yaml.safe_load((profiles_dir() / "edge-8gb.yaml").read_text())
    data["budgets"].update(budgets)
    if serving is not None:
        data["serving"] = serving
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _served_by(pid: int) -> list:
    """Processes under `pid` running `fusedeploy serve`."""
    return children_where(pid, lambda argv: "serve" in argv)


@pytest.fixture(scope="module", params=["genai", "gguf"])
def tiny_artifact(request, tiny_model_dir, tmp_path_factory):
    """A tiny artifact of each runtime; GGUF is served by llama-server, which `make setup` builds."""
    folder = tmp_path_factory.mktemp("step")
    if request.param == "gguf":
        if find_server() is None:
            pytest.skip("llama.cpp's llama-server is not built (run `make setup` or `python -m exporters.llama_server`)")
        return export_gguf(tiny_model_dir("llama"), folder / "tiny.gguf", "f32")
    return export_onnx(tiny_model_dir("llama"), folder / "tiny-genai")


@pytest.fixture(scope="module")
def step(tiny_artifact, tmp_path_factory):
    profile = load_profile("edge-8gb").model_copy(
        update={"serving": Serving(concurrency=[1, 2], duration_s=DURATION, max_tokens=4)})
    log = tmp_path_factory.mktemp("log") / "serve.log"
    t0 = time.perf_counter()
    result = serving_step(tiny_artifact, profile, HOST, log_path=log)
    return result, time.perf_counter() - t0, profile, log


def test_step_serves_loads_and_stops(step):
    result, wall, profile, log = step
    m, p = result["measured"], result["projected"]
    assert m["label"] == "measured" and p["label"] == "projected"
    assert [lv["concurrency"] for lv in m["levels"]] == [1, 2]
    for lv in m["levels"]:
        assert lv["wall_s"] < DURATION + GRACE
        assert lv["errors"] == 0, lv["first_error"]
        assert lv["requests_started"] >= lv["concurrency"]
    assert any(lv["output_tokens"] for lv in m["levels"])  # a loaded 2-core box may starve one level
    # Server start, the warm-up request, the levels, and the stop; nothing runs on.
    assert wall < m["startup_s"] + 2 * (DURATION + GRACE) + 20
    assert not _served_by(psutil.Process().pid)
    assert {"others_cores_before", "others_cores_during", "busy"} <= set(m["host_load"])
    assert "serving tiny" in log.read_text()
    assert m["server"]["parallel"] == profile.batch_size  # the profile's batch, on either runtime
    assert f"--parallel {profile.batch_size}" in log.read_text()
    ratio = profile.memory_bandwidth_gbps / HOST.memory_bandwidth_gbps
    assert p["bandwidth_ratio"] == pytest.approx(ratio)
    for lm, lp in zip(m["levels"], p["levels"]):
        assert lp["output_tokens_per_s"] == pytest.approx(lm["output_tokens_per_s"] * ratio)
    json.dumps(result, allow_nan=False)  # stage outputs are JSON


def test_a_server_that_cannot_start_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    profile = load_profile("edge-8gb").model_copy(update={"serving": Serving(duration_s=1)})
    with pytest.raises(UserError, match="load test failed") as exc:
        serving_step(bad, profile, HOST, log_path=tmp_path / "serve.log")
    assert "\n" not in str(exc.value)


def test_serving_budget_pass_and_fail_with_a_reason(step):
    result = {"artifact": "compressed-gguf-f32", **step[0]}
    at2 = next(lv for lv in result["projected"]["levels"] if lv["concurrency"] == 2)["output_tokens_per_s"]
    ok = serving_check(at2 / 2, 2, result)
    assert ok["result"] == "PASS" and ok["basis"] == "projected" and ok["figure"] == pytest.approx(at2)
    bad = serving_check(at2 * 2 + 1, 2, result)
    assert bad["result"] == "FAIL" and "tokens/s at 2 clients" in bad["reason"] and "measured on this host" in bad["reason"]
    missing = serving_check(1.0, 8, result)
    assert missing["result"] == "FAIL" and "8 clients" in missing["reason"]
    assert serving_check(1.0, 2, None)["result"] == "FAIL"


def test_signoff_judges_the_serving_budget_and_reports_the_table(step, tmp_path):
    serving = {"artifact": "compressed-gguf-f32", **step[0]}
    profile = load_profile(str(_profile_yaml(tmp_path, {"concurrency": [1, 2]}, min_serving_tokens_per_s=1e12,
                                             serving_concurrency=1))).model_dump()
    deployed = {"name": "compressed-gguf-f32", "projected": {"memory_gb": 0.1, "decode_tokens_per_s": 100.0,
                                                            "time_to_first_token_s": 0.1}}
    s = signoff(profile, deployed, [], serving=serving)
    check = s["budgets"]["min_serving_tokens_per_s"]
    assert check["result"] == "FAIL" and s["result"] == "FAIL" and check["concurrency"] == 1 and check["reason"]
    assert "min_serving_tokens_per_s" not in signoff(load_profile("edge-8gb").model_dump(), deployed, [],
                                                      serving=serving)["budgets"]
    busy = {**serving, "measured": {**serving["measured"], "host_load": {
        "busy": True, "cores": 2, "others_cores_before": 1.5, "others_cores_during": 1.8}}}
    assert any("serving load test ran on a busy host" in w
               for w in signoff(profile, deployed, [], serving=busy)["measurement"]["warnings"])
    md = "\n".join(_serving_markdown(serving))
    assert "| clients | req/s |" in md and md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1
    assert "measured on this host" in md and "projected" in md


def test_profile_serving_fields(tmp_path):
    budgeted = load_profile(str(_profile_yaml(tmp_path, min_serving_tokens_per_s=5)))
    assert budgeted.serving == Serving() and budgeted.budgets.serving_concurrency == max(Serving().concurrency)
    assert load_profile("edge-8gb").serving is None  # no section, no budget: builds stay short
    assert load_profile("edge-8gb").with_serving(True).serving == Serving()
    off = budgeted.with_serving(False)
    assert off.serving is None and off.budgets.min_serving_tokens_per_s is None
    assert budgeted.with_serving(None) is budgeted
    with pytest.raises(UserError, match="serving.concurrency"):
        load_profile(str(_profile_yaml(tmp_path, {"concurrency": [0, 2]})))
    with pytest.raises(UserError, match="repeats"):
        load_profile(str(_profile_yaml(tmp_path, {"concurrency": [2, 2]})))
    with pytest.raises(UserError, match="serving.clients.*not permitted"):
        load_profile(str(_profile_yaml(tmp_path, {"clients": 4})))
    with pytest.raises(UserError, match="without budgets.min_serving_tokens_per_s"):
        load_profile(str(_profile_yaml(tmp_path, serving_concurrency=4)))


def test_serving_concurrency_outside_the_levels_is_one_error_line(run_cli, tmp_path):
    path = _profile_yaml(tmp_path, {"concurrency": [1, 4]}, min_serving_tokens_per_s=10, serving_concurrency=16)
    code, out, err = run_cli("profiles", "show", str(path))
    assert code == 2
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "serving_concurrency 16 is not one of serving.concurrency [1, 4]" in lines[0]


@pytest.mark.parametrize("flag,want", [(None, None), ("--serve-load", True), ("--no-serve-load", False)])
def test_build_serve_load_flag_reaches_the_build(run_cli, monkeypatch, flag, want):
    seen = {}

    def fake_build(opts, **kw):
        seen["serve_load"] = opts.serve_load
        raise UserError("stop here")

    monkeypatch.setattr("fusedeploy.pipeline.build", fake_build)
    code, _, _ = run_cli("build", "--profile", "edge-8gb", *([flag] if flag else []))
    assert code == 2 and seen["serve_load"] is want

