"""Perplexity behind one interface for every runtime."""

from .perplexity import LogitsBackend, PerplexityResult, TorchBackend, perplexity, window_nll
from .runtimes import LlamaCppBackend, OnnxRuntimeBackend, backend_for_artifact

__all__ = ["LlamaCppBackend", "LogitsBackend", "OnnxRuntimeBackend", "PerplexityResult", "TorchBackend",
           "backend_for_artifact", "perplexity", "window_nll"]
