"""An OpenAI-compatible HTTP app for an ONNX Runtime GenAI folder, generating with `og.Engine`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true`), `GET /v1/models`, `GET /health`, `GET /metrics`. Request
bodies are the strict models of `api.py`: a malformed request or a field
this server does not implement is a 400 with an OpenAI-style body before
any model work happens.

Generation runs in ONNX Runtime GenAI's `og.Engine`, which schedules every
request into batched model steps (up to `parallel` sequences per step). The
engine is not thread-safe, so one driver thread owns it: requests are
submitted and cancelled through a queue, and the driver steps the engine
while any request is pending, handing each token event to its request's
asyncio queue. What the engine batches depends on the folder: with a paged
KV cache (`engine.dynamic_batching`) a request joins the running batch at
the next step (continuous batching); the folders `fusedeploy export onnx`
writes have a contiguous cache, for which 0.18's engine batches the
requests that are waiting when a batch starts, and a request arriving
mid-batch starts when that batch ends.

A client that disconnects cancels its turn in the engine (the slot frees at
the next step). Stop strings are matched here on the decoded text, holding
back any tail that could be the start of one, so no part of a stop string
is ever sent, also when it spans tokens; the engine's own stop strings
decode with `og.Tokenizer`, which misreads some byte-level BPE tokenizers
(below). `logprobs` (completions and chat, not streamed) are computed by one
`og.Generator` pass over prompt + completion -- the pass `fusedeploy verify`
checks against PyTorch -- so the numbers are the model's own; with `echo`
they cover the prompt's tokens too (the first has none), and `max_tokens: 0`
with echo scores the prompt and generates nothing (lm-eval's log-likelihood
requests). A prompt may be token ids, used as given (no BOS added).

Text goes through the folder's Hugging Face tokenizer (as everywhere else in
FuseDeploy), not `og.Tokenizer`: ONNX Runtime Extensions misreads byte-level
BPE tokenizers whose `tokenizer_config.json` names `LlamaTokenizer` (the
built-in SmolLM2's does; it turns every space into three -1 ids).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..errors import UserError
from .api import (ApiError, Body, ChatBody, CompletionBody, Metrics, error_body, protect, TokenClock, add_metrics_route,
                  cancel_on_disconnect, install_error_handlers, refuse, top_indices)

CHAT_DEFAULT_MAX_TOKENS = 512


class TextDelta:
    """Incremental detokenization: the new text each token adds, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


class StopCutter:
    """Cuts streamed text before the first stop string; never releases text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = [s for s in stops if s], ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held = ""
            return text[:min(cuts)], True
        keep = 0
        for s in self.stops:  # the longest tail of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Settings:
    """One request's generation settings, as the engine takes them."""

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(eq=False)
class _Job:
    ids: list[int]
    settings: Settings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: object = None
    turn: int = 0
    finished: bool = False


class EngineDriver:
    """The one thread that touches `og.Engine`: submits, cancels, steps, and hands events back."""

    def __init__(self, og, model, parallel: int):
        self.og, self.model, self.parallel = og, model, parallel
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, _Job] = {}  # id(og.Request) -> job; the event carries the same Python object
        self.TOKEN = int(og.EngineEventFlags.TOKEN)
        self.FINISHED = int(og.EngineEventFlags.TURN_FINISHED)
        self.FAILED = int(og.EngineEventFlags.FAILED)
        self._ready = threading.Event()
        self._failure: str | None = None
        self.thread = threading.Thread(target=self._run, name="og-engine", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._failure:
            raise UserError(f"ONNX Runtime GenAI cannot start its engine: {self._failure}")

    def _run(self) -> None:
        # The engine checks that every call comes from the thread that created it.
        try:
            self.engine = self.og.Engine(self.model)
            self.buffer = self.engine.create_event_buffer(max(64, 4 * self.parallel))
        except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with the reason
            self._failure = str(exc).splitlines()[0]
            return
        finally:
            self._ready.set()
        self._loop()

    def submit(self, job: _Job) -> None:
        self.commands.put(("submit", job))

    def cancel(self, job: _Job) -> None:
        self.commands.put(("cancel", job))

    def stop(self) -> None:
        self.commands.put(("stop", None))
        self.thread.join(timeout=5)

    @staticmethod
    def _send(job: _Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _loop(self) -> None:
        while True:
            busy = self.engine.has_pending_requests()
            try:
                command = self.commands.get_nowait() if busy else self.commands.get(timeout=0.5)
            except queue.Empty:
                command = None
            if command is not None:
                kind, job = command
                if kind == "stop":
                    return
                try:
                    (self._start if kind == "submit" else self._cancel)(job)
                except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with the reason
                    job.finished = True
                    self._send(job, ("error", str(exc).splitlines()[0]))
                continue  # every queued command first, then one engine step
            if busy:
                self._step()

    def _start(self, job: _Job) -> None:
        og, s = self.og, job.settings
        options = og.RequestOptions()
        options.set_max_session_tokens(len(job.ids) + s.max_tokens)
        request = self.engine.create_request(options=options)
        turn = og.TurnOptions(request)
        turn.set_max_generated_tokens(s.max_tokens)
        if s.min_tokens:
            turn.set_min_generated_tokens(min(s.min_tokens, s.max_tokens))
        turn.set_repetition_penalty(1.0)  # genai_config.json's search section must not change the request
        if s.temperature > 0:
            turn.set_do_sample(True)
            turn.set_temperature(s.temperature)
            turn.set_top_p(s.top_p)
            turn.set_top_k(s.top_k)
            if s.seed is not None:
                turn.set_seed(int(s.seed) & 0x7FFFFFFF)
        else:
            turn.set_do_sample(False)
            turn.set_top_k(1)
        job.request = request
        self.jobs[id(request)] = job
        job.turn = request.begin_turn(np.asarray(job.ids, dtype=np.int32), turn)

    def _cancel(self, job: _Job) -> None:
        if job.request is not None and not job.finished:
            job.request.cancel_turn(job.turn)  # the engine answers with a CANCELLED turn-finished event

    def _step(self) -> None:
        self.engine.run(self.buffer)
        for k in range(len(self.buffer)):
            event = self.buffer[k]
            job = self.jobs.get(id(event.request))
            if job is None:
                continue
            flags = int(event.flags)
            if flags & self.TOKEN:
                self._send(job, ("token", int(event.token)))
            if flags & self.FAILED:
                self._finish(job, ("error", f"the engine failed this request ({event.error_code.name})"))
            elif flags & self.FINISHED:
                self._finish(job, ("done", event.finish_reason.name))

    def _finish(self, job: _Job, item) -> None:
        job.finished = True
        self.jobs.pop(id(job.request), None)
        try:
            job.request.close()
        except Exception:  # noqa: BLE001 - closing a finished request can only fail if it is gone already
            pass
        self._send(job, item)


class GenAIEngine:
    """The loaded model, its tokenizer, and the engine driver."""

    runtime = "onnxruntime-genai"

    def __init__(self, folder: str | Path, parallel: int = 1, threads: int | None = None,
                 model_id: str | None = None):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "genai_config.json").is_file():
            raise UserError(f"{folder} is not an ONNX Runtime GenAI folder (no genai_config.json); "
                            "export it with `fusedeploy export onnx` (the default genai engine)")
        self.og = og
        self.parallel = max(1, parallel)
        raw = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        # The batch the engine schedules: `parallel` sequences per step, under whichever
        # batching the folder's cache allows (a paged cache's section is kept, its size set).
        batching = "dynamic_batching" if "dynamic_batching" in raw.get("engine", {}) else "static_batching"
        self.dynamic = batching == "dynamic_batching"  # 0.18 takes a per-request seed only then
        overlay = {"engine": {batching: {"max_batch_size": self.parallel}}}
        if threads:
            overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
        except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with the reason
            raise UserError(f"ONNX Runtime GenAI cannot load {folder}: {str(exc).splitlines()[0]}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        cfg = raw["model"]
        # The engine refuses a request longer than the search section's max_length.
        self.context_length = min(int(cfg["context_length"]), int(raw.get("search", {}).get("max_length") or 1 << 30))
        self.vocab_size = int(cfg.get("vocab_size") or len(self.tokenizer))
        eos = cfg.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.model_id = model_id or folder.name
        self.created = int(time.time())
        self.metrics = Metrics(self.runtime, self.model_id, self.parallel)
        self.driver = EngineDriver(og, self.model, self.parallel)

    def close(self) -> None:
        self.driver.stop()

    # ---- prompt building
    def chat_prompt(self, body: ChatBody) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(self, body: CompletionBody) -> tuple[list[int], str]:
        """The prompt's token ids and its text (what echo returns): text is tokenized here; token ids
        are taken as given (no BOS added) and their text is their decoding, special tokens included."""
        if body.token_ids is not None:
            ids = body.token_ids
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                               param="prompt")
            return ids, self.tokenizer.decode(ids)
        ids = self.tokenizer(body.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        return ids, body.text

    def check_length(self, ids: list[int], max_tokens: int, param: str = "max_tokens") -> None:
        if len(ids) + max_tokens > self.context_length:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + {param} ({max_tokens}) exceeds the model's "
                                f"context length {self.context_length}", param=param)

    def settings(self, body: Body, max_tokens: int) -> Settings:
        return Settings(max_tokens=max_tokens, min_tokens=max_tokens if body.ignore_eos else body.min_tokens,
                        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed)

    async def tokens(self, ids: list[int], settings: Settings):
        """Async iterator of ("token", id) ... then ("done", finish reason); cancels its turn when closed early."""
        job = _Job(ids=ids, settings=settings, loop=asyncio.get_running_loop())
        self.metrics.queued()
        started = False
        self.driver.submit(job)
        try:
            while True:
                item = await job.events.get()
                if item[0] == "error":
                    raise ApiError(500, item[1], "server_error")
                if not started:
                    started = True
                    self.metrics.started()
                yield item
                if item[0] == "done":
                    return
        finally:
            if not job.finished:
                self.driver.cancel(job)
            self.metrics.finished(started)

    def logprobs(self, ids: list[int], start: int, top: int) -> dict:
        """OpenAI completion logprobs for ids[start:] from one og.Generator pass over `ids` (its logits[i] -> ids[i+1])."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids), min_length=0, do_sample=False, repetition_penalty=1.0,
                                  num_beams=1, top_k=1)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.array(gen.get_output("logits")[0], dtype=np.float64)
        del gen
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for i in range(start, len(ids)):
            piece = self.tokenizer.decode([ids[i]])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if i == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            row = logp[i - 1]
            out["token_logprobs"].append(float(row[ids[i]]))
            best = top_indices(row, top)
            out["top_logprobs"].append({self.tokenizer.decode([int(t)]): float(row[t]) for t in best})
        return out


async def _pieces(engine: GenAIEngine, ids: list[int], settings: Settings, stops: list[str], result: dict):
    """The new text, piece by piece, cut before the first stop string; `result` gets finish reason, tokens, ids.

    One loop for streamed and whole answers, so both stop at the same place.
    """
    delta, cutter = TextDelta(engine.tokenizer), StopCutter(stops)
    clock = TokenClock(engine.metrics, result["received"])
    finish, generated, stopped = "length", [], False
    try:
        if settings.max_tokens == 0:  # echo only (scoring the prompt): nothing to generate
            return
        async for kind, value in engine.tokens(ids, settings):
            if kind == "done":
                finish = "stop" if value in ("EOS", "STOP_STRING") else "length"
                break
            generated.append(value)
            result["count"] = len(generated)  # so far (continuous usage)
            clock.tokens(time.perf_counter())
            if value in engine.eos:
                continue
            text, stopped = cutter.push(delta.push(value))
            if text:
                yield text
            if stopped:  # leaving the loop closes engine.tokens, which cancels the turn
                finish = "stop"
                break
        if not stopped and (tail := cutter.flush()):  # held back for a stop string that never came
            yield tail
    finally:
        engine.metrics.prompt_tokens.inc(len(ids))
        engine.metrics.generation_tokens.inc(len(generated))
        result.update(finish=finish, count=len(generated), ids=generated)


def _chat_logprobs(scored: dict) -> dict:
    """Completion-shaped logprobs (tokens, token_logprobs, top_logprobs) in the chat shape ({"content": [...]})."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in (top or {}).items()]}
                        for tok, lp, top in zip(scored["tokens"], scored["token_logprobs"], scored["top_logprobs"])]}


# Fields a client may send that this runtime cannot honour, and why (a 400 naming the field).
_REFUSED = {
    "presence_penalty": "og.Engine has a repetition penalty, not OpenAI's presence penalty",
    "frequency_penalty": "og.Engine has a repetition penalty, not OpenAI's frequency penalty",
}


def create_app(engine: GenAIEngine, api_key: str | None = None):
    """The ASGI app: FastAPI routes behind the API key check and the request counter."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from sse_starlette.sse import EventSourceResponse

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="FuseDeploy ONNX Runtime GenAI server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    install_error_handlers(app)
    add_metrics_route(app, engine.metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "fusedeploy"}]}

    def check_model(body: Body):
        if body.model not in (None, "", engine.model_id):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                           "not_found_error", "model")
        # Greedy decoding (temperature 0; lm-eval sends a seed with it) draws nothing: its seed changes nothing.
        if body.seed is not None and body.temperature > 0 and not engine.dynamic:
            raise ApiError(400, "'seed' is not supported here: og.Engine takes a per-request seed only for a model "
                                "with a paged KV cache (dynamic batching), which this folder does not have",
                           param="seed")

    async def run(request: Request, body: Body, ids: list[int], max_tokens: int, chat: bool, echo: str = "",
                  logprobs: int | None = None):
        """One request's answer: `body.n` choices, each its own engine request (batched together)."""
        received = time.perf_counter()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stops = body.stops
        obj = "chat.completion" if chat else "text_completion"
        base = engine.settings(body, max_tokens)
        # Different seeds, so sampled choices differ (a fixed seed stays reproducible); greedy ones are equal.
        settings = [base if i == 0 or base.seed is None else Settings(**{**base.__dict__, "seed": base.seed + i})
                    for i in range(body.n)]
        results = [{"received": received} for _ in range(body.n)]

        def usage() -> dict:
            count = sum(r.get("count", 0) for r in results)
            return {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                   "model": engine.model_id, "choices": [choice]}
            if body.continuous_usage:  # vLLM's continuous_usage_stats: the usage so far on every chunk
                out["usage"] = usage()
            return out

        if body.stream:
            async def events():
                for i in range(body.n):
                    if chat or echo:
                        yield json.dumps(chunk(i, echo or None, None, first=chat))
                merged: asyncio.Queue = asyncio.Queue()

                async def pump(i: int):
                    try:
                        async for piece in _pieces(engine, ids, settings[i], stops, results[i]):
                            await merged.put((i, piece))
                        await merged.put((i, None))
                    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                        await merged.put((i, exc))

                tasks = [asyncio.create_task(pump(i)) for i in range(body.n)]
                try:
                    remaining = body.n
                    while remaining:
                        i, piece = await merged.get()
                        if isinstance(piece, ApiError):  # the answer has begun: the error is the stream's end
                            yield json.dumps(error_body(piece.message, piece.kind, piece.param))
                            return
                        if isinstance(piece, Exception):
                            raise piece
                        if piece is None:
                            remaining -= 1
                            yield json.dumps(chunk(i, None, results[i]["finish"]))
                        else:
                            yield json.dumps(chunk(i, piece, None))
                finally:  # the client left (sse-starlette cancels us) or all ended: cancel what still runs
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                if body.include_usage:  # OpenAI's shape: a last chunk with no choices
                    yield json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                                      "model": engine.model_id, "choices": [], "usage": usage()})
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15)

        async def whole(i: int) -> str:
            return "".join([piece async for piece in _pieces(engine, ids, settings[i], stops, results[i])])

        texts = await cancel_on_disconnect(request, asyncio.gather(*(whole(i) for i in range(body.n))))
        if texts is None:  # the client left; nobody reads an answer
            from starlette.responses import Response

            return Response(status_code=499)
        choices, passes = [], {}
        for i, (text, result) in enumerate(zip(texts, results)):
            scored = None
            if logprobs is not None:
                key = tuple(result["ids"])  # n equal choices (greedy, or max_tokens 0) score once
                if key not in passes:
                    passes[key] = await asyncio.to_thread(engine.logprobs, ids + result["ids"],
                                                          0 if echo else len(ids), logprobs)
                scored = passes[key]
                if stops:  # only the tokens whose text was sent (a stop string cuts the text)
                    limit = len(echo) + len(text)
                    keep = sum(1 for off in scored["text_offset"] if off < limit) if limit else 0
                    scored = {k: v[:keep] for k, v in scored.items()}
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None if scored is None else _chat_logprobs(scored),
                                "finish_reason": result["finish"]})
                continue
            choices.append({"index": i, "text": echo + text, "logprobs": scored, "finish_reason": result["finish"]})
        return {"id": rid, "object": obj, "created": created, "model": engine.model_id, "choices": choices,
                "usage": usage()}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body)
        refuse(body, _REFUSED)
        if body.logprobs is not None and body.stream:
            raise ApiError(400, "'logprobs' is not supported with stream here: they are scored after generation",
                           param="logprobs")
        max_tokens = body.limit()
        ids, text = engine.completion_prompt(body)
        engine.check_length(ids, max_tokens)
        return await run(request, body, ids, max_tokens, chat=False, echo=text if body.echo else "",
                         logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body)
        refuse(body, _REFUSED)
        if body.logprobs and body.stream:
            raise ApiError(400, "'logprobs' is not supported with stream here: they are scored after generation",
                           param="logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs logprobs: true", param="top_logprobs")
        ids = engine.chat_prompt(body)
        limit = body.limit
        if limit is None:
            if len(ids) >= engine.context_length:
                raise ApiError(400, f"the chat prompt ({len(ids)} tokens) does not fit the model's context length "
                                    f"{engine.context_length}", param="messages")
            limit = min(CHAT_DEFAULT_MAX_TOKENS, engine.context_length - len(ids))
        engine.check_length(ids, limit, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await run(request, body, ids, limit, chat=True,
                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    return protect(app, engine.metrics, api_key)
