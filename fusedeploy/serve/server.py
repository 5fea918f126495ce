"""`fusedeploy serve ARTIFACT`: pick the server for the artifact and run it under uvicorn.

Loopback (127.0.0.1) by default: neither server authenticates, so listening
on another interface is the user's explicit choice. The socket is bound
before the app starts, so a port in use is one `error:` line, not a uvicorn
traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import UserError

LOOPBACK = "127.0.0.1"


class ValidateFirst:
    """ASGI wrapper: check an OpenAI request body with our pydantic models before the wrapped app sees it.

    llama-cpp-python's server answers a malformed body (bad JSON, a negative
    max_tokens, an empty message list) with 500 and sometimes starts
    generating; this turns those into our 400 JSON error, and passes a valid
    request through untouched. It is plain ASGI (not a BaseHTTPMiddleware)
    so that the client's disconnect still reaches the wrapped app's stream.
    """

    def __init__(self, app):
        from .genai_app import ChatBody, CompletionBody

        self.app = app
        self.models = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}

    async def __call__(self, scope, receive, send):
        model = self.models.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = _body_error(model, body)
        if error:
            from starlette.responses import JSONResponse

            from .genai_app import _error_body

            return await JSONResponse(_error_body(error[0], param=error[1]), status_code=400)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the real stream of events, disconnect included

        return await self.app(scope, replay, send)


def _body_error(model, body: bytes) -> tuple[str, str | None] | None:
    import json

    from pydantic import ValidationError

    try:
        model.model_validate(json.loads(body))
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError are both ValueErrors
        if not isinstance(exc, ValidationError):
            return "the request body is not valid JSON", None
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        return (f"{where}: {first['msg']}" if where else first["msg"]), where
    return None


def _llama_app(path: Path, n_ctx: int, threads: int | None, parallel: int):
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if parallel != 1:
        raise UserError("--parallel applies to ONNX folders; llama-cpp-python's server runs one request at a time")
    model = ModelSettings(model=str(path), model_alias=path.stem, n_ctx=n_ctx,
                          n_threads=threads or max(1, min(4, os.cpu_count() or 1)),
                          n_threads_batch=threads or max(1, min(4, os.cpu_count() or 1)), verbose=False)
    # interrupt_requests=False: by default a new request cuts off the stream in progress, which is
    # not what N clients of one server expect; they queue instead.
    server = ServerSettings(host=LOOPBACK, port=0, interrupt_requests=False)
    try:
        app = create_app(server_settings=server, model_settings=[model])
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"llama.cpp cannot load {path}: {exc}") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": path.stem}

    return ValidateFirst(app)


def build_app(artifact: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None, parallel: int = 1):
    """(app, runtime name, model id) for a .gguf file or an ONNX Runtime GenAI folder."""
    path = Path(artifact).expanduser()
    if not path.exists():
        raise UserError(f"artifact not found: {artifact}")
    if path.is_file() and path.suffix == ".gguf":
        return _llama_app(path, n_ctx, threads, parallel), "llama.cpp", path.stem
    if path.is_dir() and (path / "genai_config.json").is_file():
        from .genai_app import GenAIEngine, create_app

        engine = GenAIEngine(path, parallel=parallel, threads=threads)
        return create_app(engine), "onnxruntime-genai", engine.model_id
    if path.is_dir() and (path / "model.onnx").is_file():
        raise UserError(f"{path} is an Optimum ONNX export; serving needs an ONNX Runtime GenAI folder: "
                        "re-export with `fusedeploy export onnx` (default engine genai)")
    raise UserError(f"{artifact} is neither a .gguf file nor an ONNX Runtime GenAI folder")


def bind(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host {host!r} ({exc.strerror})") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None
    return sock


def serve(artifact: str | os.PathLike, host: str = LOOPBACK, port: int = 8000, n_ctx: int = 2048,
          threads: int | None = None, parallel: int = 1, announce=print) -> None:
    import uvicorn

    sock = bind(host, port)  # first: a busy port fails before the model loads
    app, runtime, model_id = build_app(artifact, n_ctx=n_ctx, threads=threads, parallel=parallel)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    announce(f"serving {model_id} ({runtime}) at http://{host}:{bound_port}/v1  (Ctrl-C stops)", )
    uvicorn.Server(config).run(sockets=[sock])
