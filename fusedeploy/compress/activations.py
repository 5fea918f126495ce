"""Calibration activations kept on the host, streamed to the compute device one mini-batch at a time.

At the paper's budget one activation set of a 7B model is 1024 x 2048 x 4096 values (17 GB in
bf16); scoring keeps one per block and distillation three. None of that fits beside the model
on a GPU, so, as in GPTQ and llm-compressor's sequential pipeline, every set lives in host memory
in the compute dtype (pinned on CUDA, so copies run asynchronously) and the device only ever
holds the mini-batch being computed plus the next one being copied in. On a CPU the "host" and
the "device" are the same memory and the copies are no-ops.

`StreamStats` counts the activation bytes the store has put on the device and not yet released,
and their peak: the number the memory formula in docs/compression.md predicts and the CPU tests check
does not grow with the number of calibration sequences.

When even the host cannot hold the sets (the host-memory plan says so, hostplan.py), `spilling`
puts every store created inside it in a memory-mapped file beside the output instead: the kernel
pages it in and out as mini-batches are read. The file is unlinked as soon as it is mapped, so
nothing is left behind by a kill; its name follows the output's temporaries (`.name.<random>.tmp`).

Some families need per-sequence data beside the hidden states to replay a block: Gemma 4 computes
each block's per-layer input from the token ids, and its last blocks read K/V that earlier blocks
stored in the same forward. A store therefore holds named `side` arrays with the same rows (the
token ids, shared by every store of one sequence set; the K/V live at its depth). A mini-batch
read from a store carries its rows of them (`side_of`), the runner hands them on to its output
(`with_side`) and `write` stores them, so every consumer of hidden states stays unchanged. A side
array whose name starts with "~" lives with its mini-batch only and is never stored.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.base import SEQUENCE_IDS  # the side array every store of one sequence set shares (never rewritten)


@dataclass
class StreamStats:
    live_bytes: int = 0
    peak_bytes: int = 0

    def add(self, n: int) -> None:
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, n: int) -> None:
        self.live_bytes -= n


def side_of(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-sequence arrays riding with a mini-batch of hidden states (empty for most families)."""
    return getattr(batch, "_fd_side", None) or {}


def with_side(batch: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attach per-sequence arrays to a mini-batch of hidden states; returns the same tensor."""
    if side:
        batch._fd_side = side
    return batch


# One counter per process: every store streams through it, so the peak covers inputs and outputs.
STATS = StreamStats()


def reset_stream_stats() -> StreamStats:
    STATS.live_bytes = 0
    STATS.peak_bytes = 0
    return STATS


_SPILL: list[Path] = []  # the output whose folder spilled stores go to, while `spilling` is active


@contextlib.contextmanager
def spilling(out: Path | None):
    """Stores created inside are memory-mapped files beside `out` (None: in memory, as always)."""
    if out is None:
        yield
        return
    _SPILL.append(Path(out))
    try:
        yield
    finally:
        _SPILL.pop()


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, out: Path) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    fd, path = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.ftruncate(fd, max(1, n * torch.empty((), dtype=dtype).element_size()))
        data = torch.from_file(path, shared=True, size=n, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping lives on; the file is gone from the folder
    return data.view(shape)


class ActivationStore:
    """`n` sequences of activations `[n, *tail]` in host memory (or a mapped file), in the compute dtype."""

    def __init__(self, n: int, tail: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.device = device
        self.data = self._alloc((n, *tail), dtype)
        self.side: dict[str, torch.Tensor] = {}  # per-sequence arrays with the same rows (module docstring)
        self._pending: torch.cuda.Event | None = None  # last asynchronous device->host write

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if _SPILL:  # unpinned: a mapped file cannot be pinned, so its copies to a GPU are synchronous
            return _mapped(shape, dtype, _SPILL[-1])
        return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    # -- shape -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, *self.side.values()))

    def like(self) -> ActivationStore:
        """An empty store for the same sequences: it shares their token ids; other side arrays come with writes."""
        out = ActivationStore(len(self), self.data.shape[1:], self.data.dtype, self.device)
        if SEQUENCE_IDS in self.side:
            out.side[SEQUENCE_IDS] = self.side[SEQUENCE_IDS]
        return out

    # -- writing ---------------------------------------------------------------
    def write(self, start: int, batch: torch.Tensor) -> None:
        """Copy a device mini-batch into rows start.. (asynchronously from a GPU)."""
        n = batch.shape[0]
        pairs = [(self.data[start:start + n], batch)]
        for name, t in side_of(batch).items():
            if name.startswith("~") or (name == SEQUENCE_IDS and name in self.side):
                continue  # transient; or the same sequences' ids, shared with the store this batch came from
            if name not in self.side:
                self.side[name] = self._alloc((len(self), *t.shape[1:]), t.dtype)
            pairs.append((self.side[name][start:start + n], t))
        cuda = any(t.device.type == "cuda" for _, t in pairs)
        for rows, t in pairs:
            rows.copy_(t.detach(), non_blocking=cuda)
        if cuda:
            self._pending = torch.cuda.Event()
            self._pending.record()

    def synchronize(self) -> None:
        """Wait for queued writes before the host reads the data itself (gathers, saving)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    # -- reading ---------------------------------------------------------------
    def batches(self, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, device tensor) for consecutive mini-batches, the next copy queued before yielding."""
        starts = list(range(0, len(self), batch))
        yield from self._stream([(s, self._rows(slice(s, s + batch))) for s in starts])

    def gathered(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index, device tensor) for mini-batches of arbitrary rows (the shuffled epochs)."""
        self.synchronize()
        yield from self._stream([(idx, self._rows(idx)) for idx in index_batches])

    def _rows(self, which) -> dict[str, torch.Tensor | _Gather]:
        """The hidden states (key None) and side arrays of some rows: a slice, or gathered indices."""
        arrays = {None: self.data, **self.side}
        if isinstance(which, slice):
            return {k: v[which] for k, v in arrays.items()}
        return {k: _Gather(v, which) for k, v in arrays.items()}

    def _stream(self, items) -> Iterator:
        """Double buffering: batch k+1's copy is queued before batch k is handed out."""
        live: list[int] = []  # bytes of the batches on the device, oldest first

        def load(k):
            t, n = self._to_device(items[k][1])
            live.append(n)
            return t

        try:
            nxt = load(0) if items else None
            for k, (key, _) in enumerate(items):
                cur = nxt
                nxt = load(k + 1) if k + 1 < len(items) else None
                yield key, cur
                del cur
                STATS.release(live.pop(0))
        finally:  # also when the consumer stops early
            for n in live:
                STATS.release(n)

    def _to_device(self, rows: dict) -> tuple[torch.Tensor, int]:
        moved, n = {}, 0
        for key, src in rows.items():
            host = src.materialize() if isinstance(src, _Gather) else src
            out = host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host
            moved[key] = out
            n += out.numel() * out.element_size()
        STATS.add(n)
        return with_side(moved.pop(None), moved), n


class _Gather:
    """Rows of a pinned tensor gathered into fresh pinned memory, so the copy can be asynchronous."""

    def __init__(self, data: torch.Tensor, idx: torch.Tensor):
        self.data, self.idx = data, idx

    def materialize(self) -> torch.Tensor:
        idx = self.idx.to("cpu")
        if not self.data.is_pinned():
            return self.data.index_select(0, idx)
        out = torch.empty((idx.numel(), *self.data.shape[1:]), dtype=self.data.dtype, pin_memory=True)
        return torch.index_select(self.data, 0, idx, out=out)
