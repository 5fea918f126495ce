"""Exporters: any supported Hugging Face checkpoint -> GGUF (llama.cpp) or ONNX (ONNX Runtime).

This package serves any model, compressed or not, so it never imports
`fusedeploy.compress`; a compressed model's provenance is read from the
`compression.json` that sits beside its weights.
"""

from .gguf import GGUF_TYPES, export_gguf
from .onnx import ONNX_QUANTIZE, export_onnx
from .verify import VerifyResult, verify_artifact

__all__ = ["GGUF_TYPES", "ONNX_QUANTIZE", "VerifyResult", "export_gguf", "export_onnx", "verify_artifact"]
