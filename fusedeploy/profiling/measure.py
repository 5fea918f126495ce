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


# A measurement is repeated (in a fresh worker) until the decode speed's spread across
# runs is at most SPREAD_TARGET, at most MAX_ROUNDS times; other processes using more
# than BUSY_CORES cores during it make the host "busy" and the report says so.
SPREAD_TARGET = 0.15
MAX_ROUNDS = 3
BUSY_CORES = 0.5


def die_with_parent() -> None:
    """Runs in a child (the worker, a served artifact) before exec: Linux kills it when its parent dies, even by kill -9."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class HostLoad:
    """Cores used by other processes over an interval: machine busy time minus ours (and our children's)."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()

    def others_cores(self) -> float:
        wall = max(time.perf_counter() - self.t, 1e-3)
        return max(0.0, (_busy_cpu_s() - self.busy - (_own_cpu_s() - self.own)) / wall)


def _run_worker(artifact, prompt_tokens: int, new_tokens: int, runs: int, threads, timeout_s: float) -> dict:
    args = json.dumps({"artifact": str(artifact), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                       "runs": runs, "threads": threads})
    try:
        done = subprocess.run([sys.executable, "-m", "fusedeploy.profiling.worker", args], capture_output=True,
                              text=True, timeout=timeout_s, check=False,
                              preexec_fn=die_with_parent if sys.platform == "linux" else None)
    except subprocess.TimeoutExpired:
        raise UserError(f"profiling {artifact} took longer than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"profiling {artifact} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(per_run: list[dict], key: str = "decode_tokens_per_s") -> float:
    """(max - min) / median of one figure across runs; 0 for a single run."""
    values = sorted(r[key] for r in per_run)
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    return (values[-1] - values[0]) / median if median > 0 else float("inf")


def _summary(per_run: list[dict]) -> dict:
    import statistics

    return {k: {"median": statistics.median(r[k] for r in per_run), "min": min(r[k] for r in per_run),
                "max": max(r[k] for r in per_run)} for k in per_run[0]}


def measure_artifact(artifact: str | os.PathLike, prompt_tokens: int = 128, new_tokens: int = 32, runs: int = 3,
                     threads: int | None = None, timeout_s: float = 900, max_rounds: int = MAX_ROUNDS) -> dict:
    """Time one artifact in a fresh process (see worker.py); measured figures only.

    Records the host's load before and during measurement, and repeats the
    runs while their spread is above SPREAD_TARGET (up to `max_rounds`
    workers); `stable` says whether it settled.
    """
    if runs < 1 or new_tokens < 2 or prompt_tokens < 1:
        raise UserError("profiling needs runs >= 1, new_tokens >= 2 and prompt_tokens >= 1")
    before = HostLoad()
    time.sleep(0.3)
    others_before = before.others_cores()
    during = HostLoad()
    result = _run_worker(artifact, prompt_tokens, new_tokens, runs, threads, timeout_s)
    per_run, rounds = list(result["per_run"]), 1
    while spread(per_run) > SPREAD_TARGET and rounds < max_rounds:
        per_run += _run_worker(artifact, prompt_tokens, new_tokens, runs, threads, timeout_s)["per_run"]
        rounds += 1
    result.update(per_run=per_run, metrics=_summary(per_run), runs=len(per_run), rounds=rounds,
                  spread=spread(per_run), stable=spread(per_run) <= SPREAD_TARGET,
                  host_load=host_load(others_before, during.others_cores()))
    return result


def host_load(others_before: float, others_during: float) -> dict:
    """The record of other processes' load around a measurement; `busy` when either exceeds BUSY_CORES."""
    return {"cores": os.cpu_count() or 1, "others_cores_before": round(others_before, 2),
            "others_cores_during": round(others_during, 2), "loadavg_1min": round(os.getloadavg()[0], 2),
            "busy": max(others_before, others_during) > BUSY_CORES}


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


def efficiency(shape, measured: dict, host, runtime: str, precision: str, kept: int, source: str):
    """The planner.Efficiency one measured artifact (measure_artifact's record) reached on this host.

    `host` is a HostCalibration or its dict (as stored in a build); decode is taken at the
    measurement's own average context (the prompt plus half the new tokens).
    """
    from .planner import efficiency_from

    h = host if isinstance(host, dict) else host.to_dict()
    m = measured["metrics"]
    return efficiency_from(shape, runtime, precision, kept, m["decode_tokens_per_s"]["median"],
                           m["prefill_tokens_per_s"]["median"], measured["prompt_tokens"] + measured["new_tokens"] / 2,
                           h["memory_bandwidth_gbps"], h["compute_tflops"], source)


def project(measured: dict, host: HostCalibration, profile: Profile, kv_bytes_per_token: float = 0.0,
            weights_bytes: float | None = None) -> dict:
    """Scale measured speeds to the profile by roofline ratios; memory adds the KV cache at the profile's context.

    With `weights_bytes` (what one decode step reads of the weights: the artifact's size), decode also
    pays for the larger KV cache the profile's context reads per step (half of it, on average), at the
    same effective bandwidth the measured step reached -- as the planner projects it.
    """
    m = measured["metrics"]
    bw_ratio = profile.memory_bandwidth_gbps / host.memory_bandwidth_gbps
    compute_ratio = profile.compute_tflops / host.compute_tflops
    model_rss = measured["peak_rss_bytes"] - measured["rss_before_load_bytes"]
    measured_ctx = measured["prompt_tokens"] + measured["new_tokens"]
    extra_kv = max(0.0, kv_bytes_per_token * (profile.context_length * profile.batch_size - measured_ctx))
    decode = m["decode_tokens_per_s"]["median"] * bw_ratio
    if weights_bytes:
        read_here = weights_bytes + kv_bytes_per_token * (measured["prompt_tokens"] + measured["new_tokens"] / 2)
        read_there = weights_bytes + kv_bytes_per_token * profile.context_length * profile.batch_size / 2
        decode *= read_here / read_there
    prefill = m["prefill_tokens_per_s"]["median"] * compute_ratio
    return {
        "label": "projected",
        "method": "roofline: decode x bandwidth ratio (and the KV cache read at the profile's context), "
                  "prefill x compute ratio; memory = measured model RSS + KV cache grown to the profile's "
                  "context x batch",
        "bandwidth_ratio": bw_ratio, "compute_ratio": compute_ratio,
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "time_to_first_token_s": profile.prompt_tokens / prefill,
        "memory_gb": (model_rss + extra_kv) / 1e9,
    }
