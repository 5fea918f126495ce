"""The serving load test as a step of `fusedeploy build`'s profile stage.

The deployed artifact is served by `fusedeploy serve` in a child process (a
free loopback port; the child dies with its parent, even on kill -9), loaded
by `bench_serve` at the profile's concurrency levels, and stopped. The same
CLI a user runs, so the figures are those of the server a user gets.

Figures are measured on this host. Output tokens/s, requests/s and per-token
latency are also projected onto the profile by the memory-bandwidth ratio,
the basis of the single-stream decode budget (measure.project): every served
token is a decode step, and decode is memory-bound. The server batches the
profile's `batch_size` requests at once on either runtime (llama-server's
`--parallel` slots with continuous batching; og.Engine's batch), the
sequences the target is sized to run together; the projection keeps that
scheduling, so it does not credit a target with a larger batch than its
profile gives it. Time to first token under load is queueing plus prefill
(compute-bound), so it stays measured only.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import formats
from ..errors import UserError
from .bench import Lengths, bench_serve

STARTUP_TIMEOUT_S = 300.0  # the server loads the whole model before it answers /health
STOP_TIMEOUT_S = 15.0  # uvicorn's graceful shutdown is 5 s; after this the server is killed
PROMPT_LEN = "uniform:32-128"  # words per prompt of the load test
TOKENS_PER_WORD = 4
_ANNOUNCE = re.compile(r"^serving .* at (http://\S+?)/v1\b", re.MULTILINE)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, artifact, log_path: Path, timeout_s: float) -> str:
    """The server's URL once /health answers; a one-line error if it exits or stays silent."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = log_path.read_text(encoding="utf-8", errors="replace")
        if proc.poll() is not None:
            last = (log.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
            raise UserError(f"serving {artifact} for the load test failed (exit {proc.returncode}): {last}")
        found = _ANNOUNCE.search(log)
        if found:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{found.group(1)}/health", timeout=2).status_code == 200:
                    return found.group(1)
        time.sleep(0.2)
    raise UserError(f"serving {artifact} for the load test: no answer on /health within {timeout_s:.0f} s")


@contextlib.contextmanager
def served(artifact: str | os.PathLike, parallel: int = 1, ctx: int = 2048, log_path: Path | None = None,
           timeout_s: float = STARTUP_TIMEOUT_S):
    """`fusedeploy serve ARTIFACT` on a free loopback port; yields its URL once /health answers, stops it after.

    The port is the one the server bound (`--port 0`, read from its announce
    line), so no other process can take it between choosing and binding.
    """
    from ..profiling.measure import die_with_parent

    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fusedeploy-serve-"))) / "serve.log"
        cmd = [sys.executable, "-m", "fusedeploy", "serve", str(artifact), "--port", "0", "--ctx", str(ctx),
               "--parallel", str(parallel)]
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    preexec_fn=die_with_parent if sys.platform == "linux" else None)
        try:
            yield _wait_ready(proc, artifact, log_path, timeout_s)
        finally:
            _stop(proc)


def serving_load(artifact: str | os.PathLike, concurrency: list[int], duration_s: float, max_tokens: int,
                 parallel: int = 1, log_path: Path | None = None, progress=None) -> dict:
    """Serve the artifact and load-test it; measured figures only, with the host's load around them."""
    from ..profiling.measure import HostLoad, host_load

    before = HostLoad()
    time.sleep(0.3)
    others_before = before.others_cores()
    during = HostLoad()
    # Distinct prompts (windows of the built-in corpus); at most TOKENS_PER_WORD tokens a word is generous
    # for its English and code, so this context holds prompt + output.
    ctx = TOKENS_PER_WORD * Lengths.parse(PROMPT_LEN, "prompt").upper + max_tokens + 16
    t0 = time.perf_counter()
    with served(artifact, parallel=parallel, ctx=ctx, log_path=log_path) as url:
        startup_s = time.perf_counter() - t0
        result = bench_serve(url, concurrency, duration_s, max_tokens=max_tokens, prompt_len=PROMPT_LEN,
                             progress=progress)
    # Read after the server was reaped: its CPU time then counts as ours, not as other processes'.
    others_during = during.others_cores()
    del result["url"]  # an ephemeral port: not a property of the artifact
    return {"label": "measured", "where": "this host", "server": {"parallel": parallel, "ctx": ctx},
            "startup_s": startup_s, **result, "host_load": host_load(others_before, others_during)}


def project_serving(measured: dict, host_bandwidth_gbps: float, profile_bandwidth_gbps: float) -> dict:
    """Served throughput and per-token latency scaled to the profile by the memory-bandwidth ratio."""
    ratio = profile_bandwidth_gbps / host_bandwidth_gbps
    levels = [{"concurrency": lv["concurrency"],
               "output_tokens_per_s": lv["output_tokens_per_s"] * ratio,
               "requests_per_s": lv["requests_per_s"] * ratio,
               "token_latency_s": {k: None if v is None else v / ratio for k, v in lv["token_latency_s"].items()}}
              for lv in measured["levels"]]
    return {"label": "projected", "bandwidth_ratio": ratio,
            "method": "roofline: served tokens/s and requests/s x bandwidth ratio, per-token latency / ratio; "
                      "this server's scheduling kept; time to first token not projected (queueing + prefill)",
            "levels": levels}


def serving_step(artifact: str | os.PathLike, profile, host, log_path: Path | None = None, progress=None) -> dict:
    """The profile stage's load test of one artifact: measured here, projected onto `profile`.

    Served with `--parallel` = the profile's batch size (the sequences the
    target runs at once), GGUF by llama-server and ONNX by og.Engine.
    """
    s = profile.serving
    formats.runtime_for_path(artifact)  # an artifact no runtime serves is a UserError before a server starts
    measured = serving_load(artifact, s.concurrency, s.duration_s, s.max_tokens,
                            parallel=profile.batch_size, log_path=log_path, progress=progress)
    return {"measured": measured,
            "projected": project_serving(measured, host.memory_bandwidth_gbps, profile.memory_bandwidth_gbps)}
