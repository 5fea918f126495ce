"""`fusedeploy serve ARTIFACT`: pick the server for the artifact and run it under uvicorn.

Loopback (127.0.0.1) by default: without `--api-key` nothing authenticates,
so listening on another interface is the user's explicit choice. The socket is bound
before the app starts, so a port in use is one `error:` line, not a uvicorn
traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import UserError

LOOPBACK = "127.0.0.1"


def build_app(artifact: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None, parallel: int = 1,
              api_key: str | None = None):
    """(ASGI app, runtime name, model id) for a .gguf file or an ONNX Runtime GenAI folder.

    A GGUF file is served by llama.cpp's llama-server (`llama_app.py`), an
    ONNX Runtime GenAI folder by og.Engine (`genai_app.py`); both behind the
    same request handling (`api.py`), both batching up to `parallel` requests.
    """
    path = Path(artifact).expanduser()
    if not path.exists():
        raise UserError(f"artifact not found: {artifact}")
    if parallel < 1:
        raise UserError("--parallel must be at least 1")
    if path.is_file() and path.suffix == ".gguf":
        from . import llama_app

        return llama_app.build(path, n_ctx, threads, parallel, api_key), "llama.cpp", path.stem
    if path.is_dir() and (path / "genai_config.json").is_file():
        from .genai_app import GenAIEngine, create_app

        engine = GenAIEngine(path, parallel=parallel, threads=threads)
        return create_app(engine, api_key), "onnxruntime-genai", engine.model_id
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
          threads: int | None = None, parallel: int = 1, api_key: str | None = None, announce=print) -> None:
    import uvicorn

    sock = bind(host, port)  # first: a busy port fails before the model loads
    app, runtime, model_id = build_app(artifact, n_ctx=n_ctx, threads=threads, parallel=parallel, api_key=api_key)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    announce(f"serving {model_id} ({runtime}, --parallel {parallel}) at http://{host}:{bound_port}/v1  (Ctrl-C stops)")
    uvicorn.Server(config).run(sockets=[sock])
