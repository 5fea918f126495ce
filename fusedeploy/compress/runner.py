"""Running decoder blocks standalone on cached activations (the GPTQ-style sequential pattern).

One real forward with `with_kwargs` pre-hooks on every block records the
keyword arguments each block receives (attention mask, rotary
`position_embeddings`, `position_ids`, ...). They are kept per block, because
some families differ per layer (Gemma 3: sliding vs. full attention masks and
local vs. global rotary tables), and they stay attached to the block object
when blocks are removed. Block-0 inputs are captured the same way, so family
specifics such as Gemma's embedding scaling are the model's own business.

What depends on the sequences rather than on their length cannot be captured once: Gemma 4's
per-layer inputs (from the token ids) and the K/V its last blocks read from earlier ones. The
adapter names those arguments (`sequence_arguments`), they are left out of the capture, and
`adapter.run_block` supplies them per mini-batch from the side arrays that ride with the hidden
states (activations.py): the token ids, which block-0 inputs record, and the K/V still to be read.

A streamed model (streaming.py) runs through the offload paths, which already visit one block
(scoring) or one group (distillation) at a time: entering a block there also reads it from disk,
leaving it drops it again. On a CPU the device moves are no-ops and only the reads remain.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError
from .activations import SEQUENCE_IDS, ActivationStore, side_of, with_side


class _Stop(Exception):
    pass


def _first_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class BlockRunner:
    """Holds per-block forward kwargs and runs blocks / consecutive groups on hidden states."""

    def __init__(self, model: nn.Module, adapter, device: torch.device, compute_dtype: torch.dtype,
                 offload: bool = False, stream=None):
        self.model = model
        self.adapter = adapter
        self.device = device
        self.compute_dtype = compute_dtype
        self.stream = stream  # streaming.StreamedBlocks, or None: every block is in memory
        self.offload = offload or stream is not None
        self.block_kwargs: list[dict] = []  # aligned with the *current* blocks

    # -- context ---------------------------------------------------------------
    def autocast(self):
        return autocast_for(self.device, self.compute_dtype)

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
        positional, per_sequence = self.adapter.sequence_arguments
        for i, block in enumerate(blocks):
            def hook(mod, args, kwargs, i=i):
                # No KV cache on replay: drop it under every name transformers has used (5.x: `cache`);
                # per-sequence arguments are the adapter's to supply on every call.
                kw = {k: v for k, v in kwargs.items()
                      if k not in ("hidden_states", "cache", "past_key_values", "past_key_value", *per_sequence)}
                kw["use_cache"] = False
                store[i] = _detach(kw)
                if len(args) > 1 + positional:
                    raise RuntimeError("decoder block received extra positional arguments; adapter needed")
                if i == len(store) - 1:
                    raise _Stop
                if streaming:  # offload: each block visits the device for its own forward only
                    self._enter(mod)
            hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        streaming = self.offload
        if streaming:
            def back(mod, args, out):
                self._leave(mod)  # returns None: a forward hook's return value would replace the output
            hooks += [b.register_forward_hook(back) for b in blocks]
        try:
            with self.trunk_on_device(), self.autocast():
                ids = torch.zeros(1, seq_len, dtype=torch.long, device=self._embed_device())
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
    def block0_inputs(self, ids: torch.Tensor, batch: int) -> ActivationStore:
        """Hidden states entering block 0 for every sequence in `ids` [n, T], kept on the host.

        A family whose blocks read the token ids (`sequence_arguments`) gets them recorded beside.
        """
        first = self.blocks[0]
        got: list[torch.Tensor] = []

        def hook(mod, args, kwargs):
            got.append(_first_arg(args, kwargs).detach())
            raise _Stop

        h = first.register_forward_pre_hook(hook, with_kwargs=True)
        store = None
        try:
            with self.trunk_on_device(), self.autocast():
                for s in range(0, ids.shape[0], batch):
                    try:
                        self.model(input_ids=ids[s:s + batch].to(self._embed_device()), use_cache=False)
                    except _Stop:
                        pass
                    x = got.pop()
                    if store is None:
                        store = ActivationStore(ids.shape[0], x.shape[1:], self.compute_dtype, self.device)
                    store.write(s, x)
        finally:
            h.remove()
        if any(self.adapter.sequence_arguments):
            store.side[SEQUENCE_IDS] = ids.detach().to("cpu", torch.long)
        return store

    @contextlib.contextmanager
    def trunk_on_device(self):
        """With offload, embeddings and rotary tables visit the device for block-0 inputs; blocks stay."""
        if not self.offload:
            yield
            return
        moved = _move_outside(self.model, self.blocks, self.device)
        try:
            yield
        finally:
            _move_outside(self.model, self.blocks, torch.device("cpu"), only=moved)

    # -- running ---------------------------------------------------------------
    def run_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """One block on a mini-batch; the side arrays it carries go on to the output, as the adapter says."""
        out, side = self.adapter.run_block(self.model, self.blocks, index, h, self.block_kwargs[index], side_of(h))
        return with_side(out, side)

    def run_range(self, start: int, stop: int, h: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        """Blocks start..stop-1 (current numbering) on one device mini-batch, optionally skipping one."""
        with self.autocast():
            for i in range(start, stop):
                if i != skip:
                    h = self.run_block(i, h)
        return h

    @torch.no_grad()
    def run_range_batched(self, start: int, stop: int, store: ActivationStore, batch: int,
                          skip: int | None = None) -> ActivationStore:
        """A host store through blocks start..stop-1, one mini-batch at a time; a new host store."""
        if self.offload:  # one block on the device at a time
            for i in range(start, stop):
                if i != skip:
                    store = self.run_store(i, i + 1, store, batch, None)
            return store
        return self.run_store(start, stop, store, batch, skip)

    def run_store(self, start, stop, store: ActivationStore, batch: int, skip) -> ActivationStore:
        out = store.like()
        with self.on_device(start, stop):
            for s, h in store.batches(batch):
                out.write(s, self.run_range(start, stop, h, skip))
        return out

    @contextlib.contextmanager
    def on_device(self, start: int, stop: int):
        """With offload, move blocks start..stop-1 to the device for the duration."""
        if not self.offload:
            yield
            return
        with contextlib.ExitStack() as stack:  # leaves every block entered so far, whatever happens
            for i in range(start, stop):
                self._enter(self.blocks[i])
                stack.callback(self._leave, self.blocks[i])
            yield

    @contextlib.contextmanager
    def held(self, start: int, stop: int):
        """A streamed model keeps blocks start..stop-1 in memory for the duration (a group being trained)."""
        if self.stream is None:
            yield
            return
        with contextlib.ExitStack() as stack:  # releases every block acquired so far, whatever happens
            for i in range(start, stop):
                self.stream.acquire(self.blocks[i])
                stack.callback(self.stream.release, self.blocks[i])
            yield

    def _enter(self, block: nn.Module) -> None:
        if self.stream is not None:
            self.stream.acquire(block)
        block.to(self.device)

    def _leave(self, block: nn.Module) -> None:
        block.to("cpu")
        if self.stream is not None:
            self.stream.release(block)

    def remove(self, index: int) -> None:
        """Drop one current block from the model (renumbering via the adapter) and its kwargs."""
        self.adapter.remove_blocks(self.model, [index])
        del self.block_kwargs[index]


# Low-precision compute with a fast path, per device type: bf16/fp16 on CUDA; bf16 on a CPU, where
# AVX512-BF16 or AMX run its matmuls natively (fp16 has no fast CPU path).
AUTOCAST_DTYPES = {"cuda": (torch.bfloat16, torch.float16), "cpu": (torch.bfloat16,)}


def autocast_for(device: torch.device, compute_dtype: torch.dtype):
    """Low-precision compute over fp32 master weights where the device has it; plain fp32 otherwise."""
    if compute_dtype in AUTOCAST_DTYPES.get(device.type, ()):
        return torch.autocast(device.type, dtype=compute_dtype)
    return contextlib.nullcontext()


def native_bf16_cpu() -> bool:
    """AVX512-BF16 or AMX, where bf16 autocast ran compression 1.4-1.5x faster than fp32 at the same
    quality (three seeds, docs/compression.md); torch's own CPU probes, absent on older wheels."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """The loading default (bf16 on a GPU, fp32 on a CPU), except bf16 on a CPU that computes it natively."""
    from ..models.loading import pick_dtype

    return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else pick_dtype(device)


def emulated_bf16_warning(device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """bf16 asked for on a CPU that converts it instead of computing it: it runs, but at a fraction of
    fp32's speed (a matmul probe on a Zen 3 core, docs/compression.md), so the user should hear why."""
    if device.type == "cpu" and compute_dtype == torch.bfloat16 and not native_bf16_cpu():
        return ("this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 compute is emulated and many times "
                "slower than float32; leave --dtype out or pass --dtype float32")
    return None


def check_compute_dtype(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Refuse a dtype compression would only store activations in while computing in fp32."""
    fast = AUTOCAST_DTYPES.get(device.type, ())
    if compute_dtype != torch.float32 and compute_dtype not in fast:
        name = str(compute_dtype).split(".")[-1]
        choices = ", ".join(["float32", *(str(d).split(".")[-1] for d in fast)])
        raise UserError(f"--dtype {name} has no fast compute path on {device.type}, so compression would run "
                        f"in float32 anyway; use --dtype {choices}")


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


def _move_outside(model: nn.Module, blocks: nn.Module, device: torch.device, only=None) -> list:
    """Move the parameters and buffers that are not inside `blocks`; returns what was moved."""
    inside = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
    moved = []
    for mod in model.modules():
        if mod is blocks:
            continue
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is None or id(t) in inside or (only is not None and (mod, name) not in only):
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(device)
                else:
                    store[name] = t.to(device)
                moved.append((mod, name))
    return moved
