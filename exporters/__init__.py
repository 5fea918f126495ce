"""Exporters: any supported Hugging Face checkpoint -> GGUF (llama.cpp) or ONNX (ONNX Runtime).

This package serves any model, compressed or not, so it never imports
`fusedeploy.compress`; a compressed model's provenance is read from the
`compression.json` that sits beside its weights.

The types each exporter writes are rows of `fusedeploy.formats` (precisions,
how each is made, llama.cpp file types); the exporters look them up there.
Modules: `common` (input resolution, provenance, atomic output), `gguf`,
`onnx`, `verify` (parity with the PyTorch reference in the real runtime).
"""

from .gguf import export_gguf
from .onnx import export_onnx
from .verify import VerifyResult, verify_artifact

__all__ = ["VerifyResult", "export_gguf", "export_onnx", "verify_artifact"]
