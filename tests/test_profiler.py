"""The profiler measures real artifacts in their real runtimes, each in its own process."""

import pytest

from exporters.gguf import export_gguf
from exporters.onnx import export_onnx
from fusedeploy.profiling.measure import HostCalibration, calibrate_host, measure_artifact, project
from fusedeploy.profiling.schema import load_profile
from fusedeploy.errors import UserError


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiler")
    folder = tiny_model_dir("llama")
    return export_gguf(folder, out / "tiny-f16.gguf", qtype="f16"), export_onnx(folder, out / "onnx")


@pytest.mark.parametrize("which, runtime", [(0, "llama.cpp"), (1, "onnxruntime")])
def test_measures_a_real_artifact(tiny_artifacts, which, runtime):
    result = measure_artifact(tiny_artifacts[which], prompt_tokens=32, new_tokens=8, runs=3)
    assert result["runtime"] == runtime and len(result["per_run"]) == 3 * result["rounds"] == result["runs"]
    # repeated only while noisy; the spread and the host's load are recorded either way
    assert result["stable"] == (result["spread"] <= 0.15) and (result["stable"] or result["rounds"] == 3)
    assert {"others_cores_before", "others_cores_during", "busy"} <= set(result["host_load"])
    assert result["peak_rss_bytes"] > result["rss_before_load_bytes"] > 0 and result["load_s"] > 0
    for name, stats in result["metrics"].items():
        values = [run[name] for run in result["per_run"]]
        assert stats["min"] == min(values) and stats["max"] == max(values)
        assert stats["min"] <= stats["median"] <= stats["max"] and stats["median"] > 0
    m = result["metrics"]
    assert m["latency_p50_s"]["median"] <= m["latency_p95_s"]["median"]
    first = result["per_run"][0]
    assert first["prefill_tokens_per_s"] == pytest.approx(32 / first["time_to_first_token_s"])


def test_a_broken_artifact_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="profiling .*broken.gguf failed"):
        measure_artifact(bad, prompt_tokens=8, new_tokens=2, runs=1)


def test_host_calibration_is_positive():
    host = calibrate_host(size_mb=32, repeats=2)
    assert host.memory_bandwidth_gbps > 0.1 and host.compute_tflops > 0 and host.cores >= 1


def test_projection_scales_by_roofline_ratios():
    profile = load_profile("edge-8gb")  # 51.2 GB/s, 0.28 TFLOPS, 4096 ctx, batch 1, 512-token prompt
    host = HostCalibration(memory_bandwidth_gbps=25.6, compute_tflops=0.56, cpu="test", cores=2)
    stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    measured = {"metrics": {"decode_tokens_per_s": stat(100.0), "prefill_tokens_per_s": stat(1000.0)},
                "peak_rss_bytes": 1_500_000_000, "rss_before_load_bytes": 500_000_000,
                "prompt_tokens": 64, "new_tokens": 32}
    p = project(measured, host, profile, kv_bytes_per_token=1000.0)
    assert p["label"] == "projected"
    assert p["decode_tokens_per_s"] == pytest.approx(200.0)
    assert p["prefill_tokens_per_s"] == pytest.approx(500.0)
    assert p["time_to_first_token_s"] == pytest.approx(512 / 500.0)
    assert p["memory_gb"] == pytest.approx((1e9 + 1000.0 * (4096 - 96)) / 1e9)


def test_peak_rss_is_the_workers_own_not_the_parents(tiny_artifacts):
    """A parent with a large resident set must not leak its high-water mark into the measurement."""
    ballast = bytearray(1_500_000_000)  # touch 1.5 GB in the parent before profiling
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = measure_artifact(tiny_artifacts[0], prompt_tokens=16, new_tokens=4, runs=1)
    del ballast
    assert result["peak_rss_bytes"] < 1_200_000_000
