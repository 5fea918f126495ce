"""Run in a fresh process by `measure.py`: load one artifact, time it, print JSON.

A separate process per artifact makes peak resident memory and load time the
artifact's own, not what earlier measurements left behind.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def _prompt_ids(vocab_size: int, count: int) -> list[int]:
    """Deterministic ordinary-token ids; speed does not depend on what the text says."""
    low = min(1000, vocab_size // 2)
    return [low + (i * 7919) % (vocab_size - low) for i in range(count)]


def peak_rss_bytes() -> int:
    """This process image's resident high-water mark.

    `VmHWM` belongs to the current address space, so it starts fresh at exec;
    `getrusage().ru_maxrss` does not (Linux carries it over from the parent,
    which would charge a profiled artifact with the build's own peak).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other systems: best available


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(artifact: str, prompt_tokens: int, new_tokens: int, runs: int, threads: int | None) -> dict:
    import psutil

    from fusedeploy.formats import runtime_for_path

    runtime = runtime_for_path(artifact)  # by name only: reading the file here would count in its memory
    runtime.backend_class()  # imported before the baseline, as FuseDeploy's own code is not the artifact's
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    t0 = time.perf_counter()
    backend = runtime.open(artifact, n_ctx=prompt_tokens + new_tokens, n_threads=threads, logits_all=False)
    load_s = time.perf_counter() - t0
    prompt = _prompt_ids(backend.vocab_size, prompt_tokens)

    per_run = []
    for run in range(runs + 1):  # run 0 warms caches and is not counted
        t = time.perf_counter()
        token = backend.start(prompt)
        ttft = time.perf_counter() - t
        steps = []
        for _ in range(new_tokens - 1):
            s = time.perf_counter()
            token = backend.step(token)
            steps.append(time.perf_counter() - s)
        if run:
            per_run.append({
                "time_to_first_token_s": ttft,
                "prefill_tokens_per_s": prompt_tokens / ttft,
                "decode_tokens_per_s": len(steps) / sum(steps),
                "latency_p50_s": _percentile(steps, 0.5),
                "latency_p95_s": _percentile(steps, 0.95),
            })
    peak_rss = peak_rss_bytes()
    summary = {}
    for key in per_run[0]:
        values = [r[key] for r in per_run]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {
        "artifact": artifact, "runtime": backend.name, "load_s": load_s,
        "peak_rss_bytes": peak_rss, "rss_before_load_bytes": rss_before,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "threads": threads,
        "metrics": summary, "per_run": per_run,
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    print(json.dumps(measure(**args)))


if __name__ == "__main__":
    main()
