"""A GGUF file served by llama.cpp's `llama-server`, behind FuseDeploy's request handling.

`llama-server` (built by `exporters/llama_server.py` at the runtime's own
llama.cpp commit) does the serving that matters for many users: `--parallel`
slots, continuous batching, prompt caching, stop strings held back until they
can no longer match, generation stopped when its HTTP connection closes. It
runs as a child process on a private loopback port with a random API key of
its own, so only this process talks to it.

In front of it, a small FastAPI proxy gives both runtimes one contract
(`api.py`): the same strict request models (a malformed request or a field
this server does not implement is a 400 naming it, never a 500 or a silently
dropped field), the same `--api-key` check, the same OpenAI error bodies on
every route, the same /metrics series, and /v1/models and /health. Valid
requests are forwarded as the client sent them, always as a stream upstream:
llama-server stops a streamed generation when its connection closes, but runs
a non-streamed one to the end whatever its client did, so a non-streamed
answer is put together here from the stream. When the client goes away the
proxy closes the upstream connection, and the generation stops. What
llama-server cannot do correctly is refused here with a 400 that says so
(`echo`, which it rejects; `min_tokens`). Completion `logprobs` come back in
llama-server's chat shape and are turned into the completions shape here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..errors import UserError
from .api import (ApiError, Body, ChatBody, CompletionBody, Metrics, TokenClock, add_metrics_route,
                  cancel_on_disconnect, error_body, install_error_handlers, protect, refuse)

STARTUP_TIMEOUT_S = 300.0
LOOPBACK = "127.0.0.1"

_REFUSED = {
    "echo": "llama-server does not echo the prompt (and has no prompt log-probabilities)",
    "min_tokens": "llama-server has no minimum length; send ignore_eos to generate exactly max_tokens",
}
def _free_port() -> int:
    from .server import bind

    with contextlib.closing(bind(LOOPBACK, 0)) as sock:
        return sock.getsockname()[1]


class LlamaServer:
    """`llama-server` for one GGUF file in a child process; `url` once its /health answers."""

    runtime = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int, threads: int | None, parallel: int, model_id: str,
                 timeout_s: float = STARTUP_TIMEOUT_S):
        from exporters.llama_server import server_binary

        binary = server_binary()
        self.model_id, self.parallel, self.n_ctx = model_id, parallel, n_ctx
        self.key = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        cmd = [str(binary), "--model", str(path), "--host", LOOPBACK, "--port", str(self.port),
               "--alias", model_id, "--parallel", str(parallel), "--cont-batching",
               # one KV pool shared by the slots, each request up to n_ctx tokens
               "--kv-unified", "--kv-unified-per-slot", str(n_ctx),
               "--threads", str(threads), "--threads-batch", str(threads), "--threads-http", str(parallel + 2),
               "--no-webui", "--offline", "--jinja", "--metrics"]
        self._logdir = tempfile.TemporaryDirectory(prefix="fusedeploy-llama-server-")
        self.log_path = Path(self._logdir.name) / "llama-server.log"
        preexec = None
        if sys.platform == "linux":
            from ..profiling.measure import die_with_parent

            preexec = die_with_parent
        with open(self.log_path, "wb") as log:
            # The key goes by environment, not argv: other users can read argv.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "LLAMA_API_KEY": self.key}, preexec_fn=preexec)
        try:
            self._wait_ready(path, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _tail(self, lines: int = 3) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "no output"

    def _wait_ready(self, path: Path, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"llama-server cannot serve {path} (exit {self.proc.returncode}): {self._tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise UserError(f"llama-server did not become ready within {timeout_s:.0f} s: {self._tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logdir.cleanup()


def _stream_tokens(chunk: dict) -> int:
    """Tokens a streamed chunk carries (llama-server sends one token per chunk; n > 1 interleaves choices)."""
    count = 0
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            count += 1
    return count


def _completion_logprobs(given: dict | None, top: int, offsets: dict, index: int = 0) -> dict | None:
    """llama-server's per-token logprobs ({"content": [{token, logprob, top_logprobs}]}) in the completions
    shape (tokens, token_logprobs, top_logprobs, text_offset). Its values are from the raw logits."""
    entries = (given or {}).get("content") or []
    if not entries:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in (e.get("top_logprobs") or [])[:top]})
        out["text_offset"].append(offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(e["token"])
    return out


def create_app(server: LlamaServer, api_key: str | None = None):
    """The ASGI app: FastAPI proxy routes behind the API key check and the request counter."""
    import httpx
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    metrics = Metrics(server.runtime, server.model_id, server.parallel)
    created = int(time.time())
    upstream_headers = {"Authorization": f"Bearer {server.key}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=server.parallel + 4)
    client = httpx.AsyncClient(base_url=server.url, headers=upstream_headers, limits=limits,
                               timeout=httpx.Timeout(None, connect=10))

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await client.aclose()
            server.stop()

    app = FastAPI(title="FuseDeploy llama.cpp server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    install_error_handlers(app)

    async def upstream_metrics() -> str:
        """llama-server's own series (llamacpp:*), and the queue gauges set from its slots."""
        try:
            text = (await client.get("/metrics", timeout=5)).text
        except httpx.HTTPError:
            return ""
        values = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:requests_"):
                name, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        metrics.running.set(values.get("llamacpp:requests_processing", 0))
        metrics.waiting.set(values.get("llamacpp:requests_deferred", 0))
        return text

    add_metrics_route(app, metrics, upstream_metrics)

    @app.get("/health")
    async def health():
        try:
            r = await client.get("/health", timeout=5)
        except httpx.HTTPError as exc:
            return JSONResponse(error_body(f"llama-server does not answer ({type(exc).__name__})", "server_error"),
                                status_code=503)
        if r.status_code != 200:
            return JSONResponse(error_body("llama-server is not ready", "server_error"), status_code=503)
        return {"status": "ok", "model": server.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": created,
                                            "owned_by": "fusedeploy"}]}

    def check(body: Body, refused: dict) -> None:
        if body.model not in (None, "", server.model_id):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {server.model_id!r}",
                           "not_found_error", "model")
        refuse(body, refused)
        if body.n > server.parallel:
            raise ApiError(400, f"'n' ({body.n}) exceeds this server's --parallel {server.parallel}: each choice "
                                "takes a slot", param="n")

    def upstream_error(status: int, raw: bytes) -> JSONResponse:
        try:
            err = json.loads(raw).get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        message = err.get("message") or raw.decode(errors="replace")[:300] or f"llama-server answered {status}"
        kind = err.get("type") or ("invalid_request_error" if status < 500 else "server_error")
        if kind == "exceed_context_size_error":
            kind, status = "invalid_request_error", 400
        return JSONResponse(error_body(message, kind), status_code=status if 400 <= status < 600 else 502)

    async def fan_out(request: Request, route: str, body: Body, payload: dict):
        """n > 1, not streamed: one upstream request per choice, merged. llama-server's own n answers
        with the first choice's usage only; separate requests give each choice's tokens (and seed + i)."""
        import asyncio

        one = {k: v for k, v in payload.items() if k != "n"}
        parts = [{**one, "seed": one["seed"] + i} if "seed" in one else one for i in range(body.n)]
        answers = await cancel_on_disconnect(
            request, asyncio.gather(*(forward(request, route, body, part, watch=False) for part in parts)))
        if answers is None:  # the client left; the upstream requests were cancelled with their connections
            from starlette.responses import Response

            return Response(status_code=499)
        for a in answers:
            if not isinstance(a, dict):  # an error (or the client left): the first such answer stands
                return a
        merged = answers[0]
        merged["choices"] = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        completion = sum(a["usage"]["completion_tokens"] for a in answers)
        prompt = merged["usage"]["prompt_tokens"]
        merged["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return merged

    async def forward(request: Request, route: str, body: Body, payload: dict, watch: bool = True):
        if not body.stream and payload.get("n", 1) > 1:
            return await fan_out(request, route, body, payload)
        chat = route.endswith("chat/completions")
        clock = TokenClock(metrics, time.perf_counter())
        # Upstream is always streamed, with usage: llama-server stops a streamed generation when its
        # connection closes, but (at this llama.cpp commit) runs a non-streamed one to the end whatever the
        # client did. So a non-streamed answer is put together here from the stream; written by hand because
        # llama-server has no option for it.
        upstream = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        top = None if chat else upstream.pop("logprobs", None)  # completions: logprobs = how many alternatives
        if top is not None:
            upstream["n_probs"] = max(1, top)  # 0 alternatives still wants the chosen token's logprob
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        offsets = {}  # choice index -> characters of text so far (completion logprobs' text_offset)

        async def open_upstream():
            try:
                response = await client.send(client.build_request("POST", route, json=upstream), stream=True)
            except httpx.HTTPError as exc:
                raise ApiError(502, f"llama-server does not answer ({type(exc).__name__})", "server_error") from None
            if response.status_code != 200:
                try:
                    return response, await response.aread()
                finally:
                    await response.aclose()
            return response, None

        async def chunks(response):
            """llama-server's chunks, parsed, usage taken out (OpenAI sends it once, at the end, if asked)."""
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                clock.tokens(time.perf_counter(), _stream_tokens(chunk))
                chunk.pop("timings", None)
                if (u := chunk.pop("usage", None)) is not None:
                    usage["prompt_tokens"] = max(usage["prompt_tokens"], int(u.get("prompt_tokens") or 0))
                    usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
                if top is not None:
                    for choice in chunk.get("choices") or []:
                        choice["logprobs"] = _completion_logprobs(choice.get("logprobs"), top, offsets, choice.get("index", 0))
                if chunk.get("choices") or "error" in chunk:
                    yield chunk

        def final_usage() -> dict:
            metrics.prompt_tokens.inc(usage["prompt_tokens"])
            metrics.generation_tokens.inc(usage["completion_tokens"])
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        async def whole():
            response, raw = await open_upstream()
            if raw is not None:
                return response, raw
            head, pieces, finish, logprobs = {}, [], None, []
            try:
                async for chunk in chunks(response):
                    if "error" in chunk:
                        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                        raise ApiError(int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500,
                                       err.get("message") or "llama-server failed", err.get("type") or "server_error")
                    head = head or {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
                    for choice in chunk["choices"]:
                        if chat:
                            pieces.append((choice.get("delta") or {}).get("content") or "")
                            logprobs += (choice.get("logprobs") or {}).get("content") or []
                        else:
                            pieces.append(choice.get("text") or "")
                            if choice.get("logprobs"):
                                logprobs.append(choice["logprobs"])
                        finish = choice.get("finish_reason") or finish
            finally:  # cancelled (the client left) or done: closing the connection stops llama-server's slot
                await response.aclose()
            text = "".join(pieces)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "logprobs": {"content": logprobs} if getattr(body, "logprobs", False) else None,
                          "finish_reason": finish}
            else:
                merged = None
                if top is not None:
                    merged = {k: [v for part in logprobs for v in part[k]] for k in
                              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                choice = {"index": 0, "text": text, "logprobs": merged, "finish_reason": finish}
            return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": final_usage()}

        if not body.stream:
            done = await (cancel_on_disconnect(request, whole()) if watch else whole())  # fan_out watches once
            if done is None:  # the client left; the generation was stopped with the connection
                from starlette.responses import Response

                return Response(status_code=499)
            if isinstance(done, tuple):
                return upstream_error(done[0].status_code, done[1])
            return done

        # Streamed: until llama-server's first chunk nothing is sent, so the client is watched meanwhile.
        opened = await cancel_on_disconnect(request, open_upstream())
        if opened is None:
            from starlette.responses import Response

            return Response(status_code=499)
        response, raw = opened
        if raw is not None:
            return upstream_error(response.status_code, raw)

        async def events():
            last = {}
            try:
                async for chunk in chunks(response):
                    last = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
                    yield "data: " + json.dumps(chunk) + "\n\n"
                final = final_usage()
                if body.include_usage:
                    yield "data: " + json.dumps({**last, "choices": [], "usage": final}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnected: closing the connection stops llama-server's slot
                await response.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check(body, _REFUSED)
        return await forward(request, "/v1/completions", body, _payload(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check(body, _REFUSED)
        return await forward(request, "/v1/chat/completions", body, _payload(body))

    return protect(app, metrics, api_key)


def _payload(body: Body) -> dict:
    """The request as llama-server reads it: the fields the client set, validated."""
    return body.model_dump(exclude_unset=True, exclude_none=True)


def build(path: Path, n_ctx: int, threads: int | None, parallel: int, api_key: str | None = None):
    server = LlamaServer(path, n_ctx, threads, parallel, model_id=path.stem)
    return create_app(server, api_key)
