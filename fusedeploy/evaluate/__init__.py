"""Perplexity behind one interface for every runtime."""

from .perplexity import LogitsBackend, PerplexityResult, TorchBackend, perplexity, window_nll

__all__ = ["LogitsBackend", "PerplexityResult", "TorchBackend", "perplexity", "window_nll"]
