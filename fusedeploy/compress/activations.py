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
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class StreamStats:
    live_bytes: int = 0
    peak_bytes: int = 0

    def add(self, n: int) -> None:
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, n: int) -> None:
        self.live_bytes -= n


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
        if _SPILL:  # unpinned: a mapped file cannot be pinned, so its copies to a GPU are synchronous
            self.data = _mapped((n, *tail), dtype, _SPILL[-1])
        else:
            self.data = torch.empty((n, *tail), dtype=dtype, pin_memory=device.type == "cuda")
        self._pending: torch.cuda.Event | None = None  # last asynchronous device->host write

    # -- shape -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def like(self) -> ActivationStore:
        return ActivationStore(len(self), self.data.shape[1:], self.data.dtype, self.device)

    # -- writing ---------------------------------------------------------------
    def write(self, start: int, batch: torch.Tensor) -> None:
        """Copy a device mini-batch into rows start.. (asynchronously from a GPU)."""
        rows = self.data[start:start + batch.shape[0]]
        if batch.device.type == "cuda":
            rows.copy_(batch.detach(), non_blocking=True)
            self._pending = torch.cuda.Event()
            self._pending.record()
        else:
            rows.copy_(batch.detach())

    def synchronize(self) -> None:
        """Wait for queued writes before the host reads the data itself (gathers, saving)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    # -- reading ---------------------------------------------------------------
    def batches(self, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, device tensor) for consecutive mini-batches, the next copy queued before yielding."""
        starts = list(range(0, len(self), batch))
        yield from self._stream([(s, self.data[s:s + batch]) for s in starts])

    def gathered(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index, device tensor) for mini-batches of arbitrary rows (the shuffled epochs)."""
        self.synchronize()
        yield from self._stream([(idx, _Gather(self.data, idx)) for idx in index_batches])

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

    def _to_device(self, src) -> tuple[torch.Tensor, int]:
        host = src.materialize() if isinstance(src, _Gather) else src
        if self.device.type == "cuda":
            out = host.to(self.device, non_blocking=True)
        else:
            out = host
        n = out.numel() * out.element_size()
        STATS.add(n)
        return out, n


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
