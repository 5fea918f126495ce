"""Shipped profiles validate; bad profiles and impossible budgets fail in one line; the planner chooses as specified."""

import json

import pytest
import yaml

from fusedeploy.errors import UserError
from fusedeploy.profiling.planner import ModelShape, estimate, plan
from fusedeploy.profiling.schema import load_profile, profiles_dir, shipped_profiles

SHAPE = ModelShape(blocks=10, params_per_block=100_000_000, embedding_params=100_000_000, head_params=0,
                   other_params=0, kv_heads=8, head_dim=128)


def _profile(tmp_path, **changes):
    data = yaml.safe_load((profiles_dir() / "edge-8gb.yaml").read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_profile_validates_and_cites_sources():
    names = shipped_profiles()
    required = {"edge-4gb", "edge-8gb", "edge-16gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb",
                "laptop-16gb", "datacenter-gpu"}
    assert required <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.sources


def test_without_a_checkout_the_installed_profiles_are_used(tmp_path, monkeypatch):
    """A wheel install has no repository beside the package; profiles come from <prefix>/share."""
    from fusedeploy.profiling import schema

    installed = tmp_path / "share" / "fusedeploy" / "profiles"
    installed.mkdir(parents=True)
    (installed / "edge-8gb.yaml").write_text((profiles_dir() / "edge-8gb.yaml").read_text())
    monkeypatch.delenv("FUSEDEPLOY_PROFILES", raising=False)
    monkeypatch.setattr(schema, "CHECKOUT_PROFILES", tmp_path / "no-checkout")
    monkeypatch.setattr(schema, "INSTALLED_PROFILES", installed)
    assert shipped_profiles() == ["edge-8gb"]
    assert load_profile("edge-8gb").name == "edge-8gb"


def test_malformed_profiles_name_the_bad_field(tmp_path):
    with pytest.raises(UserError, match=r"field 'budgets.max_memory_gb'"):
        load_profile(str(_profile(tmp_path, **{"budgets.max_memory_gb": -1})))
    with pytest.raises(UserError, match=r"field 'memory_bandwidth_gbps'"):
        load_profile(str(_profile(tmp_path, memory_bandwidth_gbps="fast")))
    with pytest.raises(UserError, match=r"field 'colour'.*not permitted"):
        load_profile(str(_profile(tmp_path, colour="red")))
    with pytest.raises(UserError, match=r"not llama.cpp types"):
        load_profile(str(_profile(tmp_path, quant_types=["int4"])))
    with pytest.raises(UserError, match="unknown profile 'edge-9gb'; shipped: .*edge-8gb"):
        load_profile("edge-9gb")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_profile(str(bad_yaml))


def test_a_runtime_has_one_name_and_the_old_spelling_still_loads(tmp_path):
    assert load_profile("edge-8gb").runtime == "llama.cpp"
    assert load_profile("edge-16gb").runtime == "onnxruntime"
    old = load_profile(str(_profile(tmp_path, runtime="gguf")))
    assert old.runtime == "llama.cpp" and old.model_dump()["runtime"] == "llama.cpp"
    assert load_profile(str(_profile(tmp_path, runtime="onnx", quant_types=["int8"]))).runtime == "onnxruntime"
    with pytest.raises(UserError, match=r"field 'runtime'.*unknown runtime 'tflite'; choose from llama.cpp, onnxruntime"):
        load_profile(str(_profile(tmp_path, runtime="tflite")))


def test_memory_estimate_scales_with_kept_blocks_and_bits(tmp_path):
    profile = load_profile(str(_profile(tmp_path, context_length=1000, batch_size=1)))
    dense = estimate(SHAPE, profile, 0.0, "f16")
    half = estimate(SHAPE, profile, 0.5, "f16")
    assert dense.removed_blocks == 0 and half.removed_blocks == 5
    assert dense.weights_gb == pytest.approx((10 * 1e8 + 1e8) * 2 / 1e9)
    assert half.weights_gb == pytest.approx((5 * 1e8 + 1e8) * 2 / 1e9)
    assert dense.kv_cache_gb == pytest.approx(2 * 10 * 8 * 128 * 1000 * 2 / 1e9)
    assert half.kv_cache_gb == pytest.approx(dense.kv_cache_gb / 2)
    assert half.decode_tokens_per_s > dense.decode_tokens_per_s
    assert estimate(SHAPE, profile, 0.0, "q4_k_m").weights_gb < dense.weights_gb


def test_planner_picks_least_compression_that_meets_every_budget(tmp_path):
    # dense f16 ~2.2 GB of weights + KV: too big for 1.5 GB; q8_0 dense (~1.17 GB) fits
    profile = load_profile(str(_profile(tmp_path, **{"budgets.max_memory_gb": 1.5, "context_length": 512,
                                                     "budgets.min_decode_tokens_per_s": 1,
                                                     "budgets.max_time_to_first_token_s": 100})))
    chosen = plan(SHAPE, profile).chosen
    assert (chosen.sparsity, chosen.quant) == (0.0, "q8_0")
    # a decode budget that only fewer blocks can meet forces sparsity, at the highest precision that then fits
    fast = load_profile(str(_profile(tmp_path, **{"budgets.max_memory_gb": 4.0, "context_length": 512,
                                                  "budgets.min_decode_tokens_per_s": 90,
                                                  "budgets.max_time_to_first_token_s": 100})))
    result = plan(SHAPE, fast)
    assert result.chosen.sparsity > 0 and result.chosen.fits
    earlier = [c for c in result.candidates if c.sparsity < result.chosen.sparsity]
    assert earlier and not any(c.fits for c in earlier)
    # fixing the sparsity and quant is respected
    fixed = plan(SHAPE, fast, sparsity=0.5, quant="q4_0").chosen
    assert (fixed.sparsity, fixed.quant) == (0.5, "q4_0")


def test_impossible_budget_stops_with_the_closest_candidate(tmp_path):
    profile = load_profile(str(_profile(tmp_path, **{"budgets.max_memory_gb": 0.05})))
    with pytest.raises(UserError, match=r"no candidate meets the edge-8gb budgets; closest is sparsity 0.5 \+ q4_0"):
        plan(SHAPE, profile)
    with pytest.raises(UserError, match="not offered by profile"):
        plan(SHAPE, profile, quant="int8")


def test_profiles_cli(run_cli, tmp_path):
    code, out, _ = run_cli("profiles", "show", "raspberry-pi-5-8gb")
    assert code == 0 and json.loads(out)["memory_bandwidth_gbps"] == 17.1
    code, _, err = run_cli("profiles", "show", str(_profile(tmp_path, runtime="tflite")))
    assert code == 2 and "field 'runtime'" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("profiles", "plan", "edge-8gb", "--json")
    assert code == 0, err
    chosen = json.loads(out)["chosen"]
    assert chosen["fits"] and chosen["kept_blocks"] == 30  # SmolLM2-135M fits an 8 GB box uncompressed
    code, out, _ = run_cli("profiles", "plan", "edge-8gb", "--sparsity", "0.25", "--quant", "q4_k_m", "--json")
    assert code == 0 and json.loads(out)["chosen"]["kept_blocks"] == 22
