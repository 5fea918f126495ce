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
(`min_tokens`). Completion `logprobs` come back in llama-server's chat shape
and are turned into the completions shape here.

`echo` (which llama-server rejects) is done here: the prompt's text goes
before the completion, and with `logprobs` its tokens' log-probabilities
come from `PromptScorer` (llama.cpp at the same commit, in this process,
since llama-server has no prompt log-probabilities); `max_tokens: 0` with
echo scores the prompt and generates nothing. A prompt may be token ids
(lm-eval's `local-completions` sends them), used as given. With
`stream_options.continuous_usage_stats` (vLLM's; guidellm asks for it) each
streamed chunk from the first token on carries the usage so far, from
llama-server's per-token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..errors import UserError
from .api import (ApiError, Body, ChatBody, CompletionBody, Metrics, TokenClock, add_metrics_route,
                  cancel_on_disconnect, error_body, install_error_handlers, protect, refuse, top_indices)

STARTUP_TIMEOUT_S = 300.0
LOOPBACK = "127.0.0.1"

_REFUSED = {
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
        self.path, self.model_id, self.parallel, self.n_ctx = Path(path), model_id, parallel, n_ctx
        self.key = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.threads = threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.n_vocab = None  # from llama-server's /v1/models once it answers
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
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                        models = httpx.get(f"{self.url}/v1/models", timeout=5,
                                           headers={"Authorization": f"Bearer {self.key}"}).json()
                        self.n_vocab = int(models["data"][0]["meta"]["n_vocab"])
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


class Cancelled(Exception):
    """The client left while its prompt was being scored."""


class PromptScorer:
    """Log-probabilities of a prompt's tokens, for `echo` with `logprobs`, from llama.cpp itself.

    llama-server cannot give them at this llama.cpp commit: its /v1/completions refuses `echo`
    ("Only no echo is supported"), and a slot asks for logits at the prompt's last position only
    (every position only for embeddings); no route returns prompt-token probabilities. So they are
    computed here with llama-cpp-python -- the same llama.cpp commit llama-server is built from --
    on the same GGUF file, with `logits_all=True`: the pass `fusedeploy verify` checks against
    PyTorch. The model is loaded on the first request that needs it (the weights are mapped from
    the same file, so mostly shared pages; its own KV cache of n_ctx tokens) and scores one prompt
    at a time under a lock, in a worker thread: llama-server's slots and batching are untouched,
    and scoring requests queue behind each other, not behind generations. Consecutive prompts that
    share a beginning (the choices of one multiple-choice question) evaluate only what differs.
    """

    def __init__(self, path: Path, n_ctx: int, threads: int):
        self.path, self.n_ctx, self.threads = path, n_ctx, threads
        self.llm = None
        self.lock = threading.Lock()

    def _load(self):
        if self.llm is None:
            from llama_cpp import Llama

            batch = min(self.n_ctx, 512)  # logits buffers grow with the batch, not with the context
            try:
                self.llm = Llama(str(self.path), n_ctx=self.n_ctx, n_batch=batch, n_ubatch=batch, logits_all=True,
                                 n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
            except (ValueError, RuntimeError) as exc:
                raise ApiError(500, f"llama.cpp cannot load {self.path.name} to score the prompt: {exc}",
                               "server_error") from None
        return self.llm

    def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens as llama-server makes them for a completion (special tokens added where the
        GGUF says, e.g. BOS, and special-token text parsed)."""
        with self.lock:
            return self._load().tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _piece(self, token: int) -> bytes:
        """A token's bytes as llama-server shows them (special tokens rendered, no space stripped)."""
        import ctypes

        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.llm._model.vocab, int(token), buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def score(self, ids: list[int], top: int, cancelled: threading.Event) -> dict:
        """Per token of `ids`: its bytes, its log-probability given the tokens before it (None for the first)
        and the `top` most likely tokens there, {bytes: logprob}."""
        with self.lock:
            llm = self._load()
            if len(ids) > self.n_ctx:
                raise ApiError(400, f"the prompt ({len(ids)} tokens) exceeds the context length {self.n_ctx}",
                               param="prompt")
            n_vocab = llm.n_vocab()
            if any(not 0 <= t < n_vocab for t in ids):
                raise ApiError(400, f"the prompt has a token id outside the vocabulary (0..{n_vocab - 1})",
                               param="prompt")
            have = list(llm.input_ids[:llm.n_tokens])
            same = 0
            while same < min(len(have), len(ids)) and have[same] == ids[same]:
                same += 1
            llm.n_tokens = same  # rows [0, same) of llm.scores are this prompt's already
            try:
                for start in range(same, len(ids), llm.n_batch):
                    if cancelled.is_set():
                        raise Cancelled
                    llm.eval(ids[start:start + llm.n_batch])
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises RuntimeError with the reason
                llm.n_tokens = 0
                raise ApiError(500, f"llama.cpp failed to score the prompt: {exc}", "server_error") from None
            pieces = [self._piece(t) for t in ids]
            logprobs, tops = [None], [None]
            rows = 64  # float64 rows at a time: memory stays small whatever the vocabulary
            for a in range(0, len(ids) - 1, rows):
                logits = np.asarray(llm.scores[a:min(a + rows, len(ids) - 1)], dtype=np.float64)
                peak = logits.max(axis=-1, keepdims=True)
                logp = logits - (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))
                for r, row in enumerate(logp):  # row r predicts token a + r + 1
                    logprobs.append(float(row[ids[a + r + 1]]))
                    tops.append({self._piece(int(t)): float(row[t]) for t in top_indices(row, top)})
            return {"pieces": pieces, "token_logprobs": logprobs, "top_logprobs": tops}

    def close(self) -> None:
        with self.lock:
            if self.llm is not None:
                self.llm.close()
                self.llm = None


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _echo_logprobs(scored: dict) -> dict:
    """A scored prompt in the completions logprobs shape; text_offset counts the prompt's token texts."""
    out = {"tokens": [], "token_logprobs": scored["token_logprobs"], "text_offset": [],
           "top_logprobs": [None if t is None else {_text(k): v for k, v in t.items()} for t in scored["top_logprobs"]]}
    offset = 0
    for piece in scored["pieces"]:
        out["tokens"].append(_text(piece))
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1])
    return out


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
    scorer = PromptScorer(server.path, server.n_ctx, server.threads)

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await client.aclose()
            server.stop()
            scorer.close()

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

    async def fan_out(request: Request, route: str, body: Body, payload: dict, offset: int = 0):
        """n > 1, not streamed: one upstream request per choice, merged. llama-server's own n answers
        with the first choice's usage only; separate requests give each choice's tokens (and seed + i)."""
        import asyncio

        one = {k: v for k, v in payload.items() if k != "n"}
        parts = [{**one, "seed": one["seed"] + i} if "seed" in one else one for i in range(body.n)]
        answers = await cancel_on_disconnect(
            request, asyncio.gather(*(forward(request, route, body, part, watch=False, offset=offset)
                                      for part in parts)))
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

    async def forward(request: Request, route: str, body: Body, payload: dict, watch: bool = True, offset: int = 0):
        """`offset`: where the completion's text starts in the choice's text (echo: after the prompt)."""
        if not body.stream and payload.get("n", 1) > 1:
            return await fan_out(request, route, body, payload, offset)
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
        continuous = body.stream and body.continuous_usage
        if continuous:  # each token's chunk then carries llama-server's counts so far (cache_n + prompt_n, predicted_n)
            upstream["timings_per_token"] = True
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        offsets = {i: offset for i in range(body.n)}  # choice index -> characters of text so far (text_offset)
        so_far = {"prompt": 0, "generated": {}}  # continuous usage: prompt tokens, choice index -> tokens

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
                timings = chunk.pop("timings", None)
                if continuous and timings and chunk.get("choices"):
                    so_far["prompt"] = max(so_far["prompt"], int(timings.get("cache_n") or 0)
                                           + int(timings.get("prompt_n") or 0))
                    for choice in chunk["choices"]:
                        so_far["generated"][choice.get("index", 0)] = int(timings.get("predicted_n") or 0)
                if continuous and so_far["prompt"] and chunk.get("choices") and "usage" not in chunk:
                    generated = sum(so_far["generated"].values())
                    chunk["running_usage"] = {"prompt_tokens": so_far["prompt"], "completion_tokens": generated,
                                              "total_tokens": so_far["prompt"] + generated}
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
                    if "running_usage" in chunk:  # vLLM's continuous_usage_stats
                        chunk["usage"] = chunk.pop("running_usage")
                    yield "data: " + json.dumps(chunk) + "\n\n"
                final = final_usage()
                if body.include_usage:
                    yield "data: " + json.dumps({**last, "choices": [], "usage": final}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnected: closing the connection stops llama-server's slot
                await response.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def upstream_json(route: str, payload: dict) -> dict:
        try:
            r = await client.post(route, json=payload, timeout=60)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"llama-server does not answer ({type(exc).__name__})", "server_error") from None
        if r.status_code != 200:
            raise ApiError(502, f"llama-server answered {r.status_code} on {route}", "server_error")
        return r.json()

    async def in_thread(cancelled: threading.Event, fn, *args):
        """fn(*args) in a worker thread; if the client leaves meanwhile, `cancelled` tells fn to stop."""
        try:
            return await asyncio.to_thread(fn, *args)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def prompt_part(body: CompletionBody, limit: int, cancelled: threading.Event) -> tuple[str, dict | None, int]:
        """What echo puts before the completion: the prompt's text, its logprobs (if asked), its token count."""
        ids = body.token_ids
        if body.logprobs is not None:
            if ids is None:
                ids = await in_thread(cancelled, scorer.tokenize, body.text)
            scored = await in_thread(cancelled, scorer.score, ids, body.logprobs, cancelled)
            text = body.text if body.text is not None else _text(b"".join(scored["pieces"]))
            return text, _echo_logprobs(scored), len(ids)
        if ids is not None:  # its text as llama-server detokenizes it
            return (await upstream_json("/detokenize", {"tokens": ids}))["content"], None, len(ids)
        count = 0
        if limit == 0:  # usage needs the prompt's tokens; nothing else does
            made = await upstream_json("/tokenize", {"content": body.text, "add_special": True, "parse_special": True})
            count = len(made["tokens"])
        return body.text, None, count

    def with_prompt(choice: dict, text: str, logprobs: dict | None) -> dict:
        """A completion choice with the echoed prompt before it (text, and logprobs when asked)."""
        out = {**choice, "text": text + (choice.get("text") or "")}
        if logprobs is not None:
            generated = choice.get("logprobs") or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                   "text_offset": []}
            out["logprobs"] = {k: logprobs[k] + generated[k] for k in ("tokens", "token_logprobs", "top_logprobs")}
            out["logprobs"]["text_offset"] = logprobs["text_offset"] + generated["text_offset"]  # after the prompt
        return out

    async def echoed(request: Request, body: CompletionBody, limit: int):
        """`echo`: the prompt (and, with logprobs, its tokens' log-probabilities from PromptScorer) before the
        completion llama-server generates (none for max_tokens 0)."""
        from starlette.responses import Response

        cancelled = threading.Event()
        try:
            got = await cancel_on_disconnect(request, prompt_part(body, limit, cancelled))
        except Cancelled:
            got = None
        if got is None:  # the client left
            return Response(status_code=499)
        text, logprobs, count = got
        if limit == 0:  # the prompt is the answer
            metrics.prompt_tokens.inc(count)
            head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                    "model": server.model_id}
            choices = [with_prompt({"index": i, "text": "", "logprobs": None, "finish_reason": "length"}, text,
                                   logprobs) for i in range(body.n)]
            usage = {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}
            if not body.stream:
                return {**head, "choices": choices, "usage": usage}

            async def only_prompt():
                for choice in choices:
                    yield "data: " + json.dumps({**head, "choices": [choice]}) + "\n\n"
                if body.include_usage:
                    yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(only_prompt(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        payload = {k: v for k, v in _payload(body).items() if k != "echo"}
        answer = await forward(request, "/v1/completions", body, payload, offset=len(text))
        if isinstance(answer, dict):
            answer["choices"] = [with_prompt(c, text, logprobs) for c in answer["choices"]]
            return answer
        if not isinstance(answer, StreamingResponse):  # an error, or the client left
            return answer
        inner = answer.body_iterator

        async def prompt_first():
            """The prompt as each choice's first chunk (with the upstream chunks' id), then the completion."""
            try:
                first = await anext(inner, None)
                head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                        "created": int(time.time()), "model": server.model_id}
                with contextlib.suppress(ValueError, AttributeError):
                    data = json.loads(first.removeprefix("data: "))
                    head.update({k: data[k] for k in head if k in data})
                for i in range(body.n):
                    choice = with_prompt({"index": i, "text": "", "logprobs": None, "finish_reason": None}, text,
                                         logprobs)
                    yield "data: " + json.dumps({**head, "choices": [choice]}) + "\n\n"
                if first is not None:
                    yield first
                async for part in inner:
                    yield part
            finally:
                await inner.aclose()

        answer.body_iterator = prompt_first()
        return answer

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check(body, _REFUSED)
        limit = body.limit()
        if body.token_ids is not None and server.n_vocab and max(body.token_ids) >= server.n_vocab:
            raise ApiError(400, f"prompt token id {max(body.token_ids)} is outside the vocabulary "
                                f"(0..{server.n_vocab - 1})", param="prompt")
        if body.echo:
            return await echoed(request, body, limit)
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
