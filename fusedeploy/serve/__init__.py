"""Serving: an OpenAI-compatible HTTP endpoint for an artifact (`server.py`) and its load test (`bench.py`).

GGUF files are served by llama-cpp-python's own server; ONNX Runtime GenAI
folders by our small FastAPI app (`genai_app.py`). Both answer the same
routes, so `bench.py` measures either.
"""

from .server import build_app, serve

__all__ = ["build_app", "serve"]
