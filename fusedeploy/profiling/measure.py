"""Measure artifacts in their real runtimes, and project the figures onto a target profile.

Projection is an ideal roofline: decode is memory-bound, so it scales with the
ratio of memory bandwidths; prefill is compute-bound, so it scales with the
ratio of peak compute. Every projected figure is labelled as such.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .schema import Profile


def measure_artifact(artifact: str | os.PathLike, prompt_tokens: int = 128, new_tokens: int = 32, runs: int = 3,
                     threads: int | None = None, timeout_s: float = 900) -> dict:
    """Time one artifact in a fresh process (see worker.py); measured figures only."""
    if runs < 1 or new_tokens < 2 or prompt_tokens < 1:
        raise UserError("profiling needs runs >= 1, new_tokens >= 2 and prompt_tokens >= 1")
    args = json.dumps({"artifact": str(artifact), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                       "runs": runs, "threads": threads})
    try:
        done = subprocess.run([sys.executable, "-m", "fusedeploy.profiling.worker", args], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"profiling {artifact} took longer than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"profiling {artifact} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class HostCalibration:
    memory_bandwidth_gbps: float
    compute_tflops: float
    cpu: str
    cores: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate_host(size_mb: int = 256, repeats: int = 5) -> HostCalibration:
    """This machine's sustained copy bandwidth and fp32 matmul throughput (best of a few)."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    bandwidth = 2 * src.nbytes / best / 1e9  # read + write
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best_mm = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best_mm = min(best_mm, time.perf_counter() - t)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return HostCalibration(bandwidth, 2 * n**3 / best_mm / 1e12, cpu, os.cpu_count() or 1)


def project(measured: dict, host: HostCalibration, profile: Profile, kv_bytes_per_token: float = 0.0) -> dict:
    """Scale measured speeds to the profile by roofline ratios; memory adds the KV cache at the profile's context."""
    m = measured["metrics"]
    bw_ratio = profile.memory_bandwidth_gbps / host.memory_bandwidth_gbps
    compute_ratio = profile.compute_tflops / host.compute_tflops
    model_rss = measured["peak_rss_bytes"] - measured["rss_before_load_bytes"]
    measured_ctx = measured["prompt_tokens"] + measured["new_tokens"]
    extra_kv = max(0.0, kv_bytes_per_token * (profile.context_length * profile.batch_size - measured_ctx))
    prefill = m["prefill_tokens_per_s"]["median"] * compute_ratio
    return {
        "label": "projected",
        "method": "roofline: decode x bandwidth ratio, prefill x compute ratio; memory = measured model RSS + "
                  "KV cache grown to the profile's context x batch",
        "bandwidth_ratio": bw_ratio, "compute_ratio": compute_ratio,
        "decode_tokens_per_s": m["decode_tokens_per_s"]["median"] * bw_ratio,
        "prefill_tokens_per_s": prefill,
        "time_to_first_token_s": profile.prompt_tokens / prefill,
        "memory_gb": (model_rss + extra_kv) / 1e9,
    }
