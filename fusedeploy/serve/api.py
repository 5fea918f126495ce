"""What both servers share: the OpenAI request bodies, error bodies, the API key, and /metrics.

The request bodies are strict pydantic models: a field this server does not
implement is a 400 that names it (never silently dropped), a malformed one
is a 400 with OpenAI's `{"error": {...}}` body. Both the ONNX Runtime GenAI
app and the llama-server proxy validate with these same models, so one
request means the same thing (or is refused the same way) on either runtime.

Metrics are Prometheus text (prometheus_client) with the same names on both
runtimes, measured at this HTTP layer: requests by route and status, prompt
and generated tokens, requests waiting for a slot, time to first token and
inter-token latency histograms.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

MAX_STOP = 4  # OpenAI's limit


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk that carries a token also carries the usage so far
    # (guidellm asks for it)
    continuous_usage_stats: bool = False


class Body(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)  # completions: 16 (OpenAI's default); chat: up to 512
    min_tokens: int = Field(0, ge=0)  # not OpenAI's: no end-of-sequence before this many tokens
    ignore_eos: bool = False  # not OpenAI's (llama.cpp's): generate max_tokens whatever the model says
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not OpenAI's; 0 = no limit (llama.cpp's server accepts it too)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=16)
    user: Optional[str] = None  # an end-user id for the caller's own logs; nothing to do here
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


TokenId = Annotated[StrictInt, Field(ge=0)]
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's


class CompletionBody(Body):
    # A prompt is text or token ids (OpenAI's token-array form; lm-eval's `local-completions` sends
    # ids so that its context length in tokens is exact), one per request.
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    # 0 only with echo: score the prompt, generate nothing (lm-eval's and OpenAI's legacy scoring request)
    max_tokens: Optional[int] = Field(None, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (use n for several completions of one prompt)")
            v = v[0]
        if len(v) == 0:
            raise ValueError("prompt is empty")
        return v  # a string or a list of token ids

    @property
    def text(self) -> Optional[str]:
        """The prompt's text; None for a prompt of token ids."""
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def token_ids(self) -> Optional[list[int]]:
        """The prompt's token ids, used as given (no BOS added); None for a text prompt."""
        return None if isinstance(self.prompt, str) else list(self.prompt)

    def limit(self) -> int:
        """max_tokens (OpenAI's default 16); 0 only with echo, else a 400 naming it."""
        if self.max_tokens is None:
            return COMPLETION_DEFAULT_MAX_TOKENS
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "'max_tokens' 0 generates nothing: it is only for scoring the prompt with "
                                "echo: true (and logprobs)", param="max_tokens")
        return self.max_tokens


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


def top_indices(row, k: int):
    """Indices of the k largest values of a 1-D numpy array, largest first (the top_logprobs)."""
    import numpy as np

    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-row, k - 1)[:k]
    return part[np.argsort(-row[part], kind="stable")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(exc: ValidationError | list, skip: int = 0) -> tuple[str, str | None]:
    """One line and the offending field (dotted) for a pydantic error; `skip` drops leading loc parts."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())[skip:]]
    where = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return f"unsupported field '{where}': this server does not implement it", where
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    return (f"{where}: {msg}" if where else msg), where


def parse_body(model: type[Body], raw: bytes) -> Body:
    """The validated body, or an ApiError(400) naming what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ApiError(400, message, param=param) from None


def refuse(body: Body, fields: dict[str, str]) -> None:
    """A 400 for the first field given a non-default value this runtime cannot honour; `fields`: name -> why."""
    for name, why in fields.items():
        if name in body.model_fields_set and getattr(body, name) != type(body).model_fields[name].default:
            raise ApiError(400, f"'{name}' is not supported here: {why}", param=name)


def install_error_handlers(app) -> None:
    """Every error on every route as an OpenAI-style body: validation, ApiError, 404, 405, and crashes."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()), skip=1)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)


class ApiKey:
    """ASGI wrapper: `Authorization: Bearer KEY` on every route but /health; 401 with an OpenAI body otherwise.

    Plain ASGI (not BaseHTTPMiddleware) so the client's disconnect still
    reaches the wrapped app's stream. The key is compared in constant time.
    """

    OPEN = frozenset({"/health"})

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        message = "missing API key: send Authorization: Bearer KEY" if not header else "invalid API key"
        response = JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)


# Buckets: TTFT from a few ms (tiny models, one core) to a minute (long prompts queued behind others).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The Prometheus series both servers export (own registry: several apps may live in one process)."""

    def __init__(self, runtime: str, model: str, parallel: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only restate the start time
        self.registry = r = CollectorRegistry()
        p = "fusedeploy_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of completed generations", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge(p + "requests_running", "Generations in the running batch", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Generations queued for the batch (queue depth)", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request received -> first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between consecutive tokens of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        info = Gauge(p + "server_info", "What this server runs", ["runtime", "model", "parallel"], registry=r)
        info.labels(runtime, model, str(parallel)).set(1)
        self.parallel = parallel

    # Queue depth as the runtime sees it: a generation waits until its first token, then runs.
    def queued(self) -> None:
        self.waiting.inc()

    def started(self) -> None:
        self.waiting.dec()
        self.running.inc()

    def finished(self, started: bool) -> None:
        (self.running if started else self.waiting).dec()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenClock:
    """TTFT and inter-token latency of one request, into the Metrics histograms."""

    def __init__(self, metrics: Metrics, start: float):
        self.metrics, self.start, self.last = metrics, start, None

    def tokens(self, now: float, count: int = 1) -> None:
        if count <= 0:
            return
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / count  # several tokens in one event: spread the gap
            for _ in range(count):
                self.metrics.itl.observe(gap)
        self.last = now


def add_metrics_route(app, metrics: Metrics, extra=None) -> None:
    """GET /metrics; `extra`: an async callable run first, returning more Prometheus text (or "")."""
    from starlette.responses import Response

    @app.get("/metrics", include_in_schema=False)
    async def _metrics():
        more = await extra() if extra else ""
        data, ctype = metrics.render()
        return Response(data + more.encode(), media_type=ctype)


def protect(app, metrics: Metrics, api_key: str | None):
    """The app behind the API key check, behind the request counter (so 401s are counted too)."""
    return CountRequests(ApiKey(app, api_key), metrics)


class CountRequests:
    """ASGI wrapper: count /v1/ requests by route and status (outermost, so 401s and 404s count too)."""

    ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = path if path in self.ROUTES else "other"  # a bounded label set, whatever clients send

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)


async def until_disconnected(receive) -> None:
    """Return when the client goes away (the ASGI receive channel says http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its generation stops) and return None."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None
    finally:
        watch.cancel()
