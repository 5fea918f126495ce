"""Perplexity over fixed windows, for any runtime that can return logits.

A backend only has to turn one window of token ids into next-token logits;
the scoring is shared, so PyTorch, llama.cpp and ONNX Runtime numbers come
from the same arithmetic on the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch


class LogitsBackend(Protocol):
    """A runtime that scores a token window. `logits` returns float32 [len(ids), vocab]."""

    name: str

    def logits(self, ids: list[int]) -> np.ndarray: ...


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int  # tokens scored (each window scores ctx - 1)
    windows: int
    ctx: int
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: np.ndarray | torch.Tensor, ids: list[int] | torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window, and the count scored."""
    logits_t = torch.as_tensor(logits, dtype=torch.float32)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(logits_t[:-1], ids_t[1:], reduction="sum")
    return float(nll), int(ids_t.numel() - 1)


def perplexity(
    backend: LogitsBackend,
    windows: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of every window."""
    total_nll, total_tokens = 0.0, 0
    for i, window in enumerate(windows):
        nll, count = window_nll(backend.logits(window.tolist()), window)
        total_nll += nll
        total_tokens += count
        if progress:
            progress(i + 1, len(windows))
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(windows), windows.shape[1], backend.name)


class TorchBackend:
    """A Hugging Face causal LM in PyTorch."""

    name = "pytorch"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits[0].float().cpu().numpy()
