"""Running decoder blocks standalone on cached activations (the GPTQ-style sequential pattern).

One real forward with `with_kwargs` pre-hooks on every block records the
keyword arguments each block receives (attention mask, rotary
`position_embeddings`, `position_ids`, ...). They are kept per block, because
some families differ per layer (Gemma 3: sliding vs. full attention masks and
local vs. global rotary tables), and they stay attached to the block object
when blocks are removed. Block-0 inputs are captured the same way, so family
specifics such as Gemma's embedding scaling are the model's own business.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Stop(Exception):
    pass


def _first_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class BlockRunner:
    """Holds per-block forward kwargs and runs blocks / consecutive groups on hidden states."""

    def __init__(self, model: nn.Module, adapter, device: torch.device, compute_dtype: torch.dtype,
                 offload: bool = False):
        self.model = model
        self.adapter = adapter
        self.device = device
        self.compute_dtype = compute_dtype
        self.offload = offload
        self.block_kwargs: list[dict] = []  # aligned with the *current* blocks

    # -- context ---------------------------------------------------------------
    def autocast(self):
        if self.device.type == "cuda" and self.compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks(self.model)

    def _embed_device(self):
        return self.model.get_input_embeddings().weight.device

    # -- capture ---------------------------------------------------------------
    @torch.no_grad()
    def capture_kwargs(self, seq_len: int) -> None:
        """One forward of a length-`seq_len` sequence; records every block's kwargs (batch 1)."""
        blocks = self.blocks
        store: list[dict | None] = [None] * len(blocks)
        hooks = []
        for i, block in enumerate(blocks):
            def hook(mod, args, kwargs, i=i):
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kw["past_key_values"] = None
                kw.pop("past_key_value", None)
                kw["use_cache"] = False
                store[i] = _detach(kw)
                if len(args) > 1:
                    raise RuntimeError("decoder block received extra positional arguments; adapter needed")
                if i == len(store) - 1:
                    raise _Stop
            hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        ids = torch.zeros(1, seq_len, dtype=torch.long, device=self._embed_device())
        try:
            with self._all_on_device(), self.autocast():
                self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        if any(s is None for s in store):
            raise RuntimeError("could not capture the inputs of every decoder block")
        self.block_kwargs = [_to(s, self.device) for s in store]

    @torch.no_grad()
    def block0_inputs(self, ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Hidden states entering block 0 for every sequence in `ids` [n, T] -> [n, T, d]."""
        first = self.blocks[0]
        outs = []

        def hook(mod, args, kwargs):
            outs.append(_first_arg(args, kwargs).detach())
            raise _Stop

        h = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with self._all_on_device(), self.autocast():
                for s in range(0, ids.shape[0], batch):
                    try:
                        self.model(input_ids=ids[s:s + batch].to(self._embed_device()), use_cache=False)
                    except _Stop:
                        pass
        finally:
            h.remove()
        return torch.cat(outs).to(self.device)

    @contextlib.contextmanager
    def _all_on_device(self):
        """With offload, the model lives on the CPU; a full forward needs it on the device briefly."""
        if not self.offload or self.device.type == "cpu":
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to("cpu")

    # -- running ---------------------------------------------------------------
    def run_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        out = block(h, **self.block_kwargs[index])
        return out[0] if isinstance(out, tuple) else out

    def run_range(self, start: int, stop: int, h: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        """Blocks start..stop-1 (current numbering), optionally skipping one."""
        with self.autocast():
            for i in range(start, stop):
                if i != skip:
                    h = self.run_block(i, h)
        return h

    @torch.no_grad()
    def run_range_batched(self, start: int, stop: int, h: torch.Tensor, batch: int,
                          skip: int | None = None) -> torch.Tensor:
        if self.offload and self.device.type != "cpu":  # one block on the device at a time
            for i in range(start, stop):
                if i != skip:
                    h = self._batched(i, i + 1, h, batch, None)
            return h
        return self._batched(start, stop, h, batch, skip)

    def _batched(self, start, stop, h, batch, skip):
        with self.on_device(start, stop):
            return torch.cat([self.run_range(start, stop, h[s:s + batch], skip)
                              for s in range(0, h.shape[0], batch)])

    @contextlib.contextmanager
    def on_device(self, start: int, stop: int):
        """With offload, move blocks start..stop-1 to the device for the duration."""
        if not self.offload or self.device.type == "cpu":
            yield
            return
        moved = [self.blocks[i] for i in range(start, stop)]
        for b in moved:
            b.to(self.device)
        try:
            yield
        finally:
            for b in moved:
                b.to("cpu")

    def remove(self, index: int) -> None:
        """Drop one current block from the model (renumbering via the adapter) and its kwargs."""
        self.adapter.remove_blocks(self.model, [index])
        del self.block_kwargs[index]


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
