"""Token streams from text: seeded random calibration samples and fixed evaluation windows."""

from __future__ import annotations

import torch

from ..errors import UserError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id stream, with no special tokens added.

    Leaving out BOS/EOS keeps the stream identical across tokenizers that
    differ only in their special-token habits (HF vs llama.cpp).
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_sequences(ids: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens at seeded random offsets: [count, length]."""
    if count < 1 or length < 2:
        raise UserError(f"need at least 1 sample of at least 2 tokens (asked {count} x {length})")
    if ids.numel() < length + 1:
        raise UserError(
            f"too few calibration tokens: the text has {ids.numel()}, but one sample needs {length}; "
            "use more text or a shorter seq_len setting"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (count,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `ctx` tokens from the start: [W, ctx]."""
    if ctx < 2:
        raise UserError(f"context length must be at least 2 (got {ctx})")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1 (got {max_windows})")
    count = ids.numel() // ctx
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return ids[: count * ctx].view(count, ctx)
