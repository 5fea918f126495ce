"""Perplexity behind one interface for every runtime.

Modules: `perplexity` (windowed scoring shared by every backend, and the
PyTorch backend), `runtimes` (llama.cpp and ONNX Runtime backends: logits,
greedy generation, prefill/step for the profiler). Which backend opens an
artifact is looked up in `fusedeploy.formats`.
"""

from .perplexity import LogitsBackend, PerplexityResult, TorchBackend, perplexity, window_nll
from .runtimes import LlamaCppBackend, OnnxRuntimeBackend

__all__ = ["LlamaCppBackend", "LogitsBackend", "OnnxRuntimeBackend", "PerplexityResult", "TorchBackend",
           "perplexity", "window_nll"]
