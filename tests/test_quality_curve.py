"""The quality-vs-sparsity curve: the planner's choice on measured points, its honest projection, and a real curve build."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusedeploy.errors import BudgetsUnmet
from fusedeploy.pipeline import BuildOptions, build
from fusedeploy.pipeline import curve as curve_mod
from fusedeploy.profiling.measure import HostCalibration, project
from fusedeploy.profiling.planner import IDEAL, ModelShape, efficiency_from, estimate, step_load
from fusedeploy.profiling.schema import load_profile

from .test_profiles_and_planner import SHAPE, _profile as _profile_file


def _rows(ratios):
    return [{"k": k, "removed_blocks": list(range(k)), "sparsity": k / SHAPE.blocks, "precision": "f16",
             "perplexity": 10 * r, "perplexity_ratio": r} for k, r in enumerate(ratios)]


def test_the_planner_picks_the_least_compression_that_meets_every_budget_on_a_constructed_curve(tmp_path):
    # a memory budget between the estimates at k = 4 and k = 5 needs k >= 5 (speed budgets are loose)
    mem = [estimate(SHAPE, load_profile("edge-8gb"), k / 10, "f16").memory_gb for k in (4, 5)]
    budgets = {"budgets.max_memory_gb": sum(mem) / 2, "budgets.min_decode_tokens_per_s": 0.1,
               "budgets.max_time_to_first_token_s": 1e4}
    profile = load_profile(str(_profile_file(tmp_path, **budgets, **{"budgets.max_perplexity_ratio": 1.5})))
    ratios = [1.0, 1.1, 1.2, 1.3, 1.35, 1.45, 1.6, 1.8]
    points = curve_mod.project_points(_rows(ratios), SHAPE, profile, "f16", IDEAL)
    assert [p.meets["max_memory_gb"] for p in points] == [False] * 5 + [True] * 3
    assert [p.meets["max_perplexity_ratio"] for p in points] == [True] * 6 + [False] * 2
    assert curve_mod.least_compression(points, profile).k == 5  # the only point meeting both

    tight = load_profile(str(_profile_file(tmp_path, **budgets, **{"budgets.max_perplexity_ratio": 1.4})))
    points = curve_mod.project_points(_rows(ratios), SHAPE, tight, "f16", IDEAL)
    with pytest.raises(BudgetsUnmet, match=r"closest is 5 blocks removed .* misses max_perplexity_ratio"):
        curve_mod.least_compression(points, tight)  # 1.45x against 1.4 is nearer than k = 4's memory


def test_the_calibrated_planner_projects_a_candidate_as_the_profiler_projects_its_measurement():
    """Efficiency measured on one artifact, applied by the planner, reproduces the profiler's projection of it."""
    profile = load_profile("edge-8gb")
    host = HostCalibration(memory_bandwidth_gbps=20.0, compute_tflops=0.5, cpu="test", cores=2)
    kept, prompt, new = 7, 64, 32
    stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    measured = {"metrics": {"decode_tokens_per_s": stat(9.0), "prefill_tokens_per_s": stat(40.0)},
                "peak_rss_bytes": 3e9, "rss_before_load_bytes": 1e9, "prompt_tokens": prompt, "new_tokens": new}
    eff = efficiency_from(SHAPE, "llama.cpp", "f16", kept, 9.0, 40.0, prompt + new / 2, 20.0, 0.5, "test")
    assert 0 < eff.decode and 0 < eff.prefill
    weights, _ = step_load(SHAPE, "llama.cpp", "f16", kept)
    profiled = project(measured, host, profile, SHAPE.kv_bytes_per_token(kept, "llama.cpp"), weights)
    planned = estimate(SHAPE, profile, 0.3, "f16", eff)
    assert planned.decode_tokens_per_s == pytest.approx(profiled["decode_tokens_per_s"], rel=1e-9)
    assert planned.time_to_first_token_s == pytest.approx(profiled["time_to_first_token_s"], rel=1e-9)
    ideal = estimate(SHAPE, profile, 0.3, "f16")
    assert ideal.decode_tokens_per_s > planned.decode_tokens_per_s  # the ideal roofline overstates


@pytest.fixture(scope="module")
def curve_build(tiny_model_dir, tmp_path_factory):
    """A curve to 3 of 6 blocks, with a memory budget that only k >= 2 meets: the chosen point is a rebuilt one.
    Iterative FuseGPT, whose point k is also what a separate run to k gives (Evo searches a set per sparsity)."""
    from fusedeploy.models.loading import load_config, resolve_model

    model = str(tiny_model_dir("llama"))
    root = tmp_path_factory.mktemp("curve")
    shape = ModelShape.from_config(load_config(resolve_model(model)))
    base = load_profile("edge-8gb")
    mem = [estimate(shape, base, k / shape.blocks, "f16").memory_gb for k in (1, 2)]
    path = _profile_file(root, **{"budgets.max_memory_gb": (mem[0] + mem[1]) / 2,
                                  "budgets.min_decode_tokens_per_s": 0.001,
                                  "budgets.max_time_to_first_token_s": 1e4, "budgets.max_perplexity_ratio": 100.0})
    opts = BuildOptions.quick(profile=str(path), model=model, out=str(root / "b"), max_sparsity=0.5, quant="f16",
                              method="fusegpt")
    return opts, build(opts), root / "b", shape


def test_a_curve_build_measures_every_point_and_deploys_the_least_compression(curve_build):
    opts, report, out, shape = curve_build
    curve = report["quality_curve"]
    points = curve["points"]
    assert [p["k"] for p in points] == [0, 1, 2, 3]
    assert [p["meets"]["max_memory_gb"] for p in points] == [False, False, True, True]
    assert curve["chosen_k"] == 2 and report["compression"]["deployed_removed_blocks"] == 2
    deepest = json.loads((out / "compress" / "model" / "compression.json").read_text())
    assert points[3]["removed_blocks"] == deepest["removed_blocks"]
    # the sign-off's quality figure is the curve's point: same model, same runtime, same windows
    rows = {a["variant"]: a for a in report["artifacts"]}
    assert rows["compressed"]["verify"]["ppl_artifact"] == pytest.approx(points[2]["perplexity"], rel=1e-6)
    assert rows["dense"]["verify"]["ppl_artifact"] == pytest.approx(points[0]["perplexity"], rel=1e-6)
    assert report["signoff"]["budgets"]["max_memory_gb"]["figure"] > 0
    assert "quality curve" in (out / "report" / "report.html").read_text()
    assert "| 2 | 0.333 | f16 |" in (out / "report" / "report.md").read_text()
    pj = report["projection"]
    assert set(pj) >= {"planner_ideal", "planner_calibrated", "measured_projected", "calibrated_error"}


def test_the_curves_point_is_bitwise_a_separate_run_stopped_there(curve_build, tmp_path):
    from fusedeploy.compress import CompressJob, compress_model, load_recipe

    opts, report, out, shape = curve_build
    separate = compress_model(CompressJob(opts.model, tmp_path / "k2", 2 / shape.blocks, method=opts.method,
                                          calib=opts.calib,
                                          calib_part="calib", settings=load_recipe("quick")))
    assert separate["removed_blocks"] == report["quality_curve"]["points"][2]["removed_blocks"]
    ref = load_file(tmp_path / "k2" / "model.safetensors")
    got = load_file(out / "export" / "model" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_no_point_meeting_every_budget_fails_with_the_closest_before_exporting(curve_build, tmp_path, run_cli,
                                                                               monkeypatch):
    """A decode budget the ideal roofline meets at the deepest point, but not at this host's efficiency.

    The host's copy bandwidth is pinned very high, so the efficiency the dense artifact reaches is
    tiny and the calibrated projection of every point falls far below the ideal one.
    """
    from dataclasses import replace

    from fusedeploy.profiling import measure

    opts, report, out, shape = curve_build
    real_calibrate = measure.calibrate_host
    monkeypatch.setattr(measure, "calibrate_host",
                        lambda *a, **k: replace(real_calibrate(*a, **k), memory_bandwidth_gbps=1e6))
    ideal = estimate(shape, load_profile(opts.profile), 0.5, "f16").decode_tokens_per_s
    data = yaml.safe_load(open(opts.profile))
    data["budgets"]["min_decode_tokens_per_s"] = ideal / 2
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(data))
    dest = tmp_path / "b"
    code, stdout, err = run_cli("build", "--profile", path, "--model", opts.model, "--recipe", "quick",
                                "--max-sparsity", "0.5", "--quant", "f16", "--out", dest)
    assert code == 1 and "sign-off FAIL: no point of the quality curve (0..3 blocks removed)" in stdout
    assert "closest is 3 blocks removed" in stdout and "misses min_decode_tokens_per_s" in stdout
    assert (dest / "curve" / "curve.json").is_file() and not (dest / "export").exists()


def test_max_sparsity_and_sparsity_together_are_one_error(run_cli, tiny_model_dir, tmp_path):
    code, _, err = run_cli("build", "--profile", "edge-8gb", "--model", tiny_model_dir("llama"), "--sparsity", "0.2",
                           "--max-sparsity", "0.5", "--out", tmp_path / "b")
    assert code == 2 and "error:" in err and "pass one" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("build", "--profile", "edge-8gb", "--model", tiny_model_dir("llama"),
                           "--max-sparsity", "1.0", "--out", tmp_path / "b")
    assert code == 2 and "--max-sparsity must be in (0, 1)" in err
