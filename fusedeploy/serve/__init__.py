"""Serving: an OpenAI-compatible HTTP endpoint for an artifact (`server.py`) and its load test (`bench.py`).

GGUF files are served by llama.cpp's `llama-server` behind a small proxy
(`llama_app.py`); ONNX Runtime GenAI folders by `og.Engine` (`genai_app.py`).
Both check requests with the same models and answer the same routes
(`api.py`), so `bench.py` measures either.
"""

from .server import build_app, serve

__all__ = ["build_app", "serve"]
