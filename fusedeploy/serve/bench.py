"""`fusedeploy bench-serve URL`: streaming clients against an OpenAI-compatible server, in bounded time.

Every request gets its own prompt: from a JSONL file (one record per
prompt, field `prompt` or `text`), or a window of a text file (default: the
built-in corpus) at a random offset, its length in words drawn from
`prompt_len`. No two requests share a prefix, so a server's prompt cache
does not flatter its time to first token. Output lengths are drawn from
`output_len`; each request asks for exactly that many tokens (greedy,
`ignore_eos`, which both `fusedeploy serve` runtimes honour).

Two ways to load the server, each level ending by itself within its
duration (requests still in flight are then cut off, their connections
closed: a server must survive that):
- fixed concurrency: N clients each send requests back to back;
- Poisson arrivals at a rate of R requests/s (exponential gaps, seeded), open
  loop: a request is sent when it arrives, however many are in flight.

Measured per level, over the level's window:
- requests/s: requests completed within the window / window;
- output tokens/s: streamed text chunks received within the window
  (completed and cut-off requests alike) / window; both servers stream one
  token per chunk;
- time to first token (TTFT): request sent -> first text chunk, per request;
- inter-token latency: the gap between consecutive text chunks of a request,
  over all requests; each as p50/p95/p99;
- goodput: completed requests per second that met the SLO (TTFT <=
  `slo_ttft_s` and mean inter-token gap <= `slo_itl_s`), and their share.
An untimed warm-up request runs first.

No load-testing library fits "async SSE clients, fixed or Poisson load,
bounded time, these percentiles, no network" without bringing its own
runner and dataset downloads (locust, k6, guidellm), so this is a small
asyncio + httpx loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

MAX_IN_FLIGHT = 512  # Poisson mode: beyond this many open requests the level stops sending (and says so)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def q(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99)}


# ---------------------------------------------------------------- argument parsing (strict: the CLI's too)

def int_list(text: str, name: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]. An empty item ('1,,2') is a typo, not a shorter list; an item must be ASCII
    digits (no sign, point or exponent), at least 1, and short enough to be a client count."""
    values = []
    for i, item in enumerate(str(text).split(","), 1):
        item = item.strip()
        if not (item.isascii() and item.isdigit() and len(item) <= 6 and int(item) >= 1):
            what = "empty" if not item else repr(item[:20])
            shown = repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
            raise UserError(f"{name} {shown}: item {i} is {what}; give comma-separated counts of at least 1, "
                            "e.g. 1,4,16")
        values.append(int(item))
    return values


def float_list(text: str, name: str) -> list[float]:
    """'0.5,2' -> [0.5, 2.0]; empty items, non-numbers, non-finite and non-positive values are refused."""
    items = [x.strip() for x in str(text).split(",")]
    try:
        values = [float(x) for x in items] if all(items) else []
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(f"{name} {text!r}: give comma-separated positive numbers, e.g. 0.5,2,8")
    return values


def positive_seconds(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a positive, finite number of seconds (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class Lengths:
    """A length distribution: fixed:N, uniform:A-B, or normal:MEAN,STD (clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int, name: str) -> "Lengths":
        text = str(spec).strip()
        if re.fullmatch(r"\d+", text):
            text = f"fixed:{text}"
        m = (re.fullmatch(r"fixed:(\d+)", text) or re.fullmatch(r"uniform:(\d+)-(\d+)", text)
             or re.fullmatch(r"normal:(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)", text))
        if not m:
            raise UserError(f"{name} {spec!r}: give N, fixed:N, uniform:A-B or normal:MEAN,STD (tokens)")
        kind = text.split(":")[0]
        a, b = float(m.group(1)), float(m.group(2)) if m.lastindex > 1 else 0.0
        if a < 1 or (kind == "uniform" and b < a):
            raise UserError(f"{name} {spec!r}: lengths must be at least 1 (and A <= B)")
        return cls(kind, a, b)

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def upper(self) -> int:
        """A length no draw exceeds in practice (normal: mean + 4 std)."""
        return int({"fixed": self.a, "uniform": self.b, "normal": self.a + 4 * self.b}[self.kind])


class Prompts:
    """Distinct prompts, one per request: JSONL records in a seeded order, or random windows of a text."""

    def __init__(self, source: str | Path | None, prompt_len: Lengths, seed: int = 0):
        self.rng = random.Random(seed)
        self.prompt_len = prompt_len
        self.records: list[str] | None = None
        path = Path(source) if source else None
        if path is not None and not path.is_file():
            raise UserError(f"--prompts {source}: no such file (a .txt text or a .jsonl file of prompts)")
        if path is not None and path.suffix == ".jsonl":
            self.records = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record.get("prompt") or record.get("text")
                except (ValueError, AttributeError):
                    text = None
                if not isinstance(text, str) or not text.strip():
                    raise UserError(f"--prompts {path}:{n}: each line must be a JSON object with a non-empty "
                                    "'prompt' (or 'text') string")
                self.records.append(text)
            if not self.records:
                raise UserError(f"--prompts {path}: no prompts in it")
            self.rng.shuffle(self.records)
            self.next = 0
        else:
            from ..data.sources import builtin_text

            text = path.read_text(encoding="utf-8", errors="replace") if path else builtin_text()
            self.words = text.split()
            if len(self.words) < prompt_len.upper + 1:
                raise UserError(f"--prompts {source}: {len(self.words)} words, fewer than the longest prompt "
                                f"asked for ({prompt_len.upper})")

    def draw(self) -> str:
        if self.records is not None:  # in a shuffled order; repeats only after every record was used
            text = self.records[self.next % len(self.records)]
            self.next += 1
            return text
        n = min(self.prompt_len.draw(self.rng), len(self.words) - 1)
        start = self.rng.randrange(0, len(self.words) - n)
        return " ".join(self.words[start:start + n])

    @property
    def longest_chars(self) -> int:
        if self.records is not None:
            return max(len(r) for r in self.records)
        return self.prompt_len.upper * (max(len(w) for w in self.words[:20000]) + 1)


# ---------------------------------------------------------------- one level

@dataclass
class LevelResult:
    mode: str  # "concurrency" or "rate"
    concurrency: int | None  # clients (concurrency mode)
    rate: float | None  # requests/s offered (rate mode)
    duration_s: float
    wall_s: float  # the level's whole time, cut-off and connection teardown included
    requests_started: int = 0
    requests_completed: int = 0
    errors: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0  # of completed requests, as the server counted them
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    goodput_requests_per_s: float = 0.0  # completed requests that met the SLO, per second
    slo_attained: float | None = None  # their share of completed requests
    ttft_s: dict = field(default_factory=dict)
    token_latency_s: dict = field(default_factory=dict)
    first_error: str | None = None
    send_limited: bool = False  # rate mode: MAX_IN_FLIGHT reached, arrivals were dropped


@dataclass
class _Stats:
    started: int = 0
    completed: int = 0
    errors: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    good: int = 0
    ttft: list = field(default_factory=list)
    itl: list = field(default_factory=list)
    first_error: str | None = None


async def _one_request(client, url: str, payload: dict, stats: _Stats, deadline: float, slo: tuple) -> None:
    sent = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    usage = None
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
            usage = chunk.get("usage") or usage
            text = (chunk.get("choices") or [{}])[0].get("text")
            if not text:
                continue
            now = time.perf_counter()
            if now > deadline:
                return
            stats.tokens += 1
            if first is None:
                first = now - sent
                stats.ttft.append(first)
            else:
                gaps.append(now - last)
            last = now
    stats.itl.extend(gaps)
    if time.perf_counter() <= deadline:
        stats.completed += 1
        stats.prompt_tokens += int((usage or {}).get("prompt_tokens") or 0)
        slo_ttft, slo_itl = slo
        mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
        if first is not None and (slo_ttft is None or first <= slo_ttft) and (slo_itl is None or mean_gap <= slo_itl):
            stats.good += 1


async def _request(client, url: str, make_payload, stats: _Stats, deadline: float, slo: tuple) -> None:
    stats.started += 1
    try:
        await _one_request(client, url, make_payload(), stats, deadline, slo)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, and the load goes on
        stats.errors += 1
        stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"


async def _client_loop(client, url: str, make_payload, stats: _Stats, deadline: float, slo: tuple) -> None:
    while time.perf_counter() < deadline:
        errors = stats.errors
        await _request(client, url, make_payload, stats, deadline, slo)
        if stats.errors > errors:
            await asyncio.sleep(0.05)


async def _arrivals(client, url: str, make_payload, stats: _Stats, deadline: float, slo: tuple, rate: float,
                    rng: random.Random, tasks: list, flags: dict) -> None:
    """Poisson arrivals: exponential gaps of mean 1/rate; each arrival is its own task."""
    next_at = time.perf_counter()
    while True:
        next_at += rng.expovariate(rate)
        if next_at >= deadline:
            return
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if sum(1 for t in tasks if not t.done()) >= MAX_IN_FLIGHT:
            flags["send_limited"] = True
            continue
        tasks.append(asyncio.create_task(_request(client, url, make_payload, stats, deadline, slo)))


async def _level(url: str, make_payload, duration: float, slo: tuple, headers: dict, concurrency: int | None = None,
                 rate: float | None = None, seed: int = 0, grace: float = 2.0) -> LevelResult:
    import httpx

    stats, flags = _Stats(), {"send_limited": False}
    width = concurrency or MAX_IN_FLIGHT
    limits = httpx.Limits(max_connections=width + 2, max_keepalive_connections=min(width, 64) + 2)
    timeout = httpx.Timeout(duration + 30, connect=10)
    start = time.perf_counter()
    deadline = start + duration
    try:
        # The hard bound: whatever a server or a socket does, the level ends by duration + 2 * grace.
        async with asyncio.timeout(duration + 2 * grace):
            async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
                tasks: list = []
                if concurrency:
                    tasks += [asyncio.create_task(_client_loop(client, url, make_payload, stats, deadline, slo))
                              for _ in range(concurrency)]
                    await asyncio.wait(tasks, timeout=duration)
                else:
                    await _arrivals(client, url, make_payload, stats, deadline, slo, rate, random.Random(seed),
                                    tasks, flags)
                    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
                for task in tasks:  # requests still in flight: cut them off, their connections close
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=grace)
    except TimeoutError:
        pass
    wall = time.perf_counter() - start
    elapsed = min(wall, duration)
    return LevelResult(
        mode="concurrency" if concurrency else "rate", concurrency=concurrency, rate=rate, duration_s=elapsed,
        wall_s=wall, requests_started=stats.started, requests_completed=stats.completed, errors=stats.errors,
        output_tokens=stats.tokens, prompt_tokens=stats.prompt_tokens, requests_per_s=stats.completed / elapsed,
        output_tokens_per_s=stats.tokens / elapsed, goodput_requests_per_s=stats.good / elapsed,
        slo_attained=stats.good / stats.completed if stats.completed else None,
        ttft_s=percentiles(stats.ttft), token_latency_s=percentiles(stats.itl), first_error=stats.first_error,
        send_limited=flags["send_limited"])


async def _model_id(url: str, headers: dict) -> str:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10, headers=headers) as client:
            response = await client.get(f"{url}/v1/models")
            if response.status_code == 401:
                raise UserError(f"the server at {url} wants an API key: pass --api-key")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(f"no OpenAI-compatible server answers at {url} ({type(exc).__name__}: {exc}); "
                        "start one with `fusedeploy serve ARTIFACT`") from None


def base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"{url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8000")
    return url[:-3] if url.endswith("/v1") else url


async def _run(url: str, concurrency: list[int], rates: list[float], duration: float, prompts: Prompts,
               output_len: Lengths, slo: tuple, api_key: str | None, seed: int, progress=None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = await _model_id(url, headers)
    rng = random.Random(seed + 1)

    def make_payload() -> dict:
        return {"model": model, "prompt": prompts.draw(), "max_tokens": output_len.draw(rng), "ignore_eos": True,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}

    async with httpx.AsyncClient(timeout=60, headers=headers) as client:  # untimed: loads caches, checks the route
        try:
            await _one_request(client, url, {**make_payload(), "max_tokens": 4}, _Stats(), float("inf"), (None, None))
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            raise UserError(f"the server at {url} fails completion requests ({exc})") from None
    levels = []
    for n in concurrency:
        if progress:
            progress(f"{n} clients")
        levels.append(asdict(await _level(url, make_payload, duration, slo, headers, concurrency=n)))
    for i, r in enumerate(rates):
        if progress:
            progress(f"{r:g} requests/s")
        levels.append(asdict(await _level(url, make_payload, duration, slo, headers, rate=r, seed=seed + 100 + i)))
    return {"url": url, "model": model, "output_len": asdict(output_len), "prompt_len": asdict(prompts.prompt_len),
            "prompts": "jsonl records" if prompts.records is not None else "text windows",
            "max_tokens": output_len.upper, "duration_s": duration,
            "slo": {"ttft_s": slo[0], "inter_token_s": slo[1]}, "levels": levels}


def bench_serve(url: str, concurrency: list[int] | None, duration: float, max_tokens: int = 64,
                rates: list[float] | None = None, prompts: str | Path | None = None,
                prompt_len: str | int = "uniform:32-128", output_len: str | int | None = None,
                slo_ttft_s: float | None = None, slo_itl_s: float | None = None, api_key: str | None = None,
                seed: int = 0, progress=None) -> dict:
    """Load-test the server at `url`: fixed-concurrency levels, then Poisson-rate levels; see the module doc."""
    concurrency, rates = list(concurrency or []), list(rates or [])
    if not concurrency and not rates:
        raise UserError("give --concurrency levels, --rate levels, or both")
    if any(not isinstance(n, int) or n < 1 for n in concurrency):
        raise UserError("--concurrency takes positive integers, e.g. 1,4,16")
    if any(not math.isfinite(r) or r <= 0 for r in rates):
        raise UserError("--rate takes positive request rates, e.g. 0.5,2,8")
    duration = positive_seconds(duration, "--duration")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    for name, value in (("--slo-ttft", slo_ttft_s), ("--slo-itl", slo_itl_s)):
        if value is not None:
            positive_seconds(value, name)
    out = Lengths.parse(output_len if output_len is not None else max_tokens, "--output-len")
    source = Prompts(prompts, Lengths.parse(prompt_len, "--prompt-len"), seed)
    return asyncio.run(_run(base_url(url), concurrency, rates, duration, source, out, (slo_ttft_s, slo_itl_s),
                            api_key, seed, progress))
