"""An OpenAI-compatible HTTP app for an ONNX Runtime GenAI folder (FastAPI + sse-starlette).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true`), `GET /v1/models`, `GET /health`. Request bodies are
pydantic models, so a malformed request is a 400 with an OpenAI-style
`{"error": {...}}` body before any model work happens.

The model runs in `og.Generator`, one generator per request with a KV buffer
of exactly prompt + max_tokens. Generators are stepped in worker threads
(ONNX Runtime releases the GIL); `parallel` bounds how many are active at
once, the rest queue (llama.cpp's server, the GGUF side, serves one at a
time). Streaming is server-sent events; when a client goes away mid-stream,
sse-starlette cancels the response task, the `finally` below frees the
generator and the slot, and the server carries on.

Text goes through the folder's Hugging Face tokenizer (as everywhere else in
FuseDeploy), not `og.Tokenizer`: ONNX Runtime Extensions misreads byte-level
BPE tokenizers whose `tokenizer_config.json` names `LlamaTokenizer` (the
built-in SmolLM2's does; it turns every space into three -1 ids).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

from contextlib import aclosing

import anyio
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs: null, ...)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)  # completions: 16 (OpenAI's default); chat: up to 512
    min_tokens: int = Field(0, ge=0)  # not OpenAI's; llama.cpp's server has it: no end-of-sequence before this
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not OpenAI's; 0 = no limit (llama.cpp's server accepts it too)
    seed: Optional[int] = None
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=1)


class CompletionBody(_Body):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


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


class GenAIEngine:
    """The loaded model, its tokenizer, and the slots that bound concurrent generators."""

    def __init__(self, folder: str | Path, parallel: int = 1, threads: int | None = None,
                 model_id: str | None = None):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "genai_config.json").is_file():
            raise UserError(f"{folder} is not an ONNX Runtime GenAI folder (no genai_config.json); "
                            "export it with `fusedeploy export onnx` (the default genai engine)")
        self.og = og
        try:
            config = og.Config(str(folder))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": int(threads)}}}}))
            self.model = og.Model(config)
        except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with the reason
            raise UserError(f"ONNX Runtime GenAI cannot load {folder}: {str(exc).splitlines()[0]}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        self.context_length = int(cfg["context_length"])
        eos = cfg.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.model_id = model_id or folder.name
        self.created = int(time.time())
        self.parallel = max(1, parallel)
        self.slots = anyio.Semaphore(self.parallel)  # async: a request cancelled while queued holds nothing

    # ---- prompt building
    def chat_prompt(self, messages: list[Message]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(self, prompt: str | list[str]) -> list[int]:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        if len(ids) + max_tokens > self.context_length:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context length {self.context_length}", param="max_tokens")

    def generator(self, ids: list[int], body: _Body, max_tokens: int):
        self.check_length(ids, max_tokens)
        params = self.og.GeneratorParams(self.model)
        options = dict(max_length=len(ids) + max_tokens, min_length=len(ids) + min(body.min_tokens, max_tokens),
                       do_sample=body.temperature > 0, repetition_penalty=1.0,
                       num_beams=1)
        if body.temperature > 0:
            options.update(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k or 0)
            if body.seed is not None:
                options["random_seed"] = int(body.seed)
        else:
            options["top_k"] = 1
        params.set_search_options(**options)
        gen = self.og.Generator(self.model, params)
        return gen

    async def tokens(self, ids: list[int], body: _Body, max_tokens: int):
        """Async iterator of (token, text piece, is_eos); holds a slot while it runs. Close it (aclosing)."""
        async with self.slots:
            gen = self.generator(ids, body, max_tokens)
            await anyio.to_thread.run_sync(gen.append_tokens, np.asarray(ids, dtype=np.int32))
            delta = TextDelta(self.tokenizer)
            count = 0

            def step():
                gen.generate_next_token()
                return int(gen.get_next_tokens()[0])

            while count < max_tokens and not gen.is_done():
                token = await anyio.to_thread.run_sync(step)
                count += 1
                if token in self.eos:
                    yield token, "", True
                    return
                yield token, delta.push(token), False


def _stop_at(text: str, stop: list[str]) -> int | None:
    cut = [text.find(s) for s in stop if s and s in text]
    return min(cut) if cut else None


async def _pieces(engine: GenAIEngine, ids, body, max_tokens: int, stop: list[str] | None, result: dict):
    """The new text, piece by piece, cut before the first stop string; `result` gets finish reason and token count.

    One loop for streamed and whole answers, so both stop at the same place.
    """
    text, finish, count = "", "length", 0
    async with aclosing(engine.tokens(ids, body, max_tokens)) as tokens:
        async for _, piece, eos in tokens:
            count += 1
            if eos:
                finish = "stop"
                break
            cut = _stop_at(text + piece, stop) if stop else None
            if cut is not None:
                tail = (text + piece)[len(text):cut]
                if tail:
                    yield tail
                finish = "stop"
                break
            text += piece
            if piece:
                yield piece
    result.update(finish=finish, count=count)


def create_app(engine: GenAIEngine):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="FuseDeploy ONNX Runtime GenAI server", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(_error_body("the request body is not valid JSON"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(_error_body(msg, param=where), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(_error_body(str(exc.detail), "not_found_error" if exc.status_code == 404
                                        else "invalid_request_error"), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "fusedeploy"}]}

    def check_model(body: _Body):
        if body.model not in (None, "", engine.model_id):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                           "not_found_error", "model")

    async def run(body: _Body, ids: list[int], max_tokens: int, chat: bool):
        check_model(body)
        engine.check_length(ids, max_tokens)  # before answering 200
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        obj = "chat.completion" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": engine.model_id, "choices": [choice]}

        if body.stream:
            async def events():
                if chat:
                    yield json.dumps(chunk(None, None, first=True))
                result = {}
                async for piece in _pieces(engine, ids, body, max_tokens, stop, result):
                    yield json.dumps(chunk(piece, None))
                finish, count = result["finish"], result["count"]
                final = chunk(None, finish)
                final["usage"] = {"prompt_tokens": len(ids), "completion_tokens": count,
                                  "total_tokens": len(ids) + count}
                yield json.dumps(final)
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15)

        result = {}
        text = "".join([piece async for piece in _pieces(engine, ids, body, max_tokens, stop, result)])
        if stop and (cut := _stop_at(text, stop)) is not None:  # a stop string that began in an earlier piece
            text = text[:cut]
        finish, count = result["finish"], result["count"]
        usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": engine.model_id, "choices": [choice],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await run(body, engine.completion_prompt(body.prompt), body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        ids = engine.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(512, engine.context_length - len(ids))
        return await run(body, ids, max_tokens, chat=True)

    return app
