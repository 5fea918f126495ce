"""`fusedeploy bench-serve URL`: N concurrent streaming clients against an OpenAI-compatible server.

For each concurrency level, N clients each send streaming `/v1/completions`
requests back to back (greedy, `min_tokens = max_tokens` so every request
asks for the same output length; both llama-cpp-python's server and ours
honour `min_tokens`) until the level's time is up; then requests still in
flight are cancelled (their connections closed: a server must survive
that). Every level ends by itself within `duration` plus a short grace.

Measured per level, over the level's wall time:
- requests/s: requests completed within the window / window;
- output tokens/s: streamed text chunks received within the window
  (completed and cut-off requests alike) / window. Both servers stream one
  token per chunk; a multi-byte character split over two tokens arrives
  as one chunk and counts once;
- time to first token (TTFT): request sent -> first text chunk, per request;
- per-token latency: the gap between consecutive text chunks of a request
  (inter-token latency), over all requests;
each as p50/p95/p99. An untimed warm-up request runs first.

No load-testing library fits "N async clients, SSE, bounded time, these
percentiles" without bringing its own runner and report (locust, k6), so
this is a small asyncio + httpx loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

from ..errors import UserError

DEFAULT_PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type made books "
                  "cheaper to produce than ever before. Within fifty years presses had spread across Europe, and "
                  "the number of printed books grew into the millions. Write a short summary of what followed.")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def q(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99)}


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    wall_s: float  # the level's whole time, cut-off and connection teardown included
    requests_started: int = 0
    requests_completed: int = 0
    errors: int = 0
    output_tokens: int = 0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    ttft_s: dict = field(default_factory=dict)
    token_latency_s: dict = field(default_factory=dict)
    first_error: str | None = None


def base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"{url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8000")
    return url[:-3] if url.endswith("/v1") else url


async def _one_request(client, url: str, payload: dict, stats: dict, deadline: float) -> None:
    sent = time.perf_counter()
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")[:200]
            raise RuntimeError(f"HTTP {response.status_code}: {body}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:200])
            text = (chunk.get("choices") or [{}])[0].get("text")
            if not text:
                continue
            now = time.perf_counter()
            if now > deadline:
                return
            stats["tokens"] += 1
            if last is None:
                stats["ttft"].append(now - sent)
            else:
                stats["itl"].append(now - last)
            last = now
    if time.perf_counter() <= deadline:
        stats["completed"] += 1


async def _client_loop(client, url: str, payload: dict, stats: dict, deadline: float) -> None:
    while time.perf_counter() < deadline:
        stats["started"] += 1
        try:
            await _one_request(client, url, payload, stats, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, and the client goes on
            stats["errors"] += 1
            stats.setdefault("first_error", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)


async def _level(url: str, payload: dict, concurrency: int, duration: float, grace: float = 2.0) -> LevelResult:
    import httpx

    stats = {"started": 0, "completed": 0, "errors": 0, "tokens": 0, "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    timeout = httpx.Timeout(duration + 30, connect=10)
    start = time.perf_counter()
    deadline = start + duration
    try:
        # The hard bound: whatever a server or a socket does, the level ends by duration + 2 * grace.
        async with asyncio.timeout(duration + 2 * grace):
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                tasks = [asyncio.create_task(_client_loop(client, url, payload, stats, deadline))
                         for _ in range(concurrency)]
                await asyncio.wait(tasks, timeout=duration)
                for task in tasks:  # requests still in flight: cut them off, their connections close
                    task.cancel()
                await asyncio.wait(tasks, timeout=grace)
    except TimeoutError:
        pass
    wall = time.perf_counter() - start
    elapsed = min(wall, duration)
    return LevelResult(
        concurrency=concurrency, duration_s=elapsed, wall_s=wall, requests_started=stats["started"],
        requests_completed=stats["completed"], errors=stats["errors"], output_tokens=stats["tokens"],
        requests_per_s=stats["completed"] / elapsed, output_tokens_per_s=stats["tokens"] / elapsed,
        ttft_s=percentiles(stats["ttft"]), token_latency_s=percentiles(stats["itl"]),
        first_error=stats.get("first_error"))


async def _model_id(url: str) -> str:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{url}/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(f"no OpenAI-compatible server answers at {url} ({type(exc).__name__}: {exc}); "
                        "start one with `fusedeploy serve ARTIFACT`") from None


async def _run(url: str, concurrency: list[int], duration: float, max_tokens: int, prompt: str,
               progress=None) -> dict:
    model = await _model_id(url)
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
               "temperature": 0.0, "stream": True}
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:  # one untimed request: loads caches, checks the route
        stats = {"tokens": 0, "ttft": [], "itl": [], "completed": 0}
        try:
            await _one_request(client, url, {**payload, "max_tokens": 4, "min_tokens": 4}, stats, float("inf"))
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            raise UserError(f"the server at {url} fails completion requests ({exc})") from None
    levels = []
    for n in concurrency:
        if progress:
            progress(n)
        levels.append(asdict(await _level(url, payload, n, duration)))
    return {"url": url, "model": model, "max_tokens": max_tokens, "prompt_chars": len(prompt),
            "duration_s": duration, "levels": levels}


def bench_serve(url: str, concurrency: list[int], duration: float, max_tokens: int = 64,
                prompt: str = DEFAULT_PROMPT, progress=None) -> dict:
    if not concurrency or any(n < 1 for n in concurrency):
        raise UserError("--concurrency takes positive integers, e.g. 1,4,16")
    if duration <= 0:
        raise UserError("--duration must be positive (seconds per concurrency level)")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    return asyncio.run(_run(base_url(url), list(concurrency), float(duration), int(max_tokens), prompt, progress))
