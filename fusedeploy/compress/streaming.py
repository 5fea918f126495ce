"""A model larger than host memory: embeddings, final norm and head resident, blocks read when used.

The model is built on the meta device (accelerate's `init_empty_weights`, buffers real), then only
the parameters outside the blocks are read from the checkpoint. A block's fp32 master copy exists
only while the runner uses it: `acquire` reads it -- from the checkpoint's safetensors shards, or,
once a group's distillation has changed it, from the block file the run wrote -- and `release`
puts its parameters back on the meta device. Holds are counted, so a group held for its whole
distillation survives the per-block visits inside it.

A changed block goes to `<out>.state/block-<original index>.<iteration>.safetensors`: the resumable
state names these files (state.py), and a file is only ever written under a new iteration's name,
so a kill mid-iteration leaves the last saved state's files intact.

Files are opened per read (`safe_open` maps the whole file; a mapping kept open would count every
page ever read as resident), and nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

BLOCK_FILE = "block-{orig}.{version}.safetensors"


class Checkpoint:
    """Which safetensors file of a Hugging Face folder holds each tensor (one file, or shards + index)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

        self.folder = Path(folder)
        index, single = self.folder / SAFE_WEIGHTS_INDEX_NAME, self.folder / SAFE_WEIGHTS_NAME
        if index.is_file():
            try:
                self.where = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a readable safetensors index; restore the model folder") from None
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self.where = {k: SAFE_WEIGHTS_NAME for k in f.keys()}
        else:
            raise UserError(f"streaming reads safetensors checkpoints, and {self.folder} has neither "
                            f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; give a Hugging Face folder "
                            "or raise --max-host-memory so the model loads whole")

    def read(self, names: list[str], folder: Path | None = None, file: str | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed again."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(file or self.where[n], []).append(n)
        out = {}
        for fname, group in by_file.items():
            with safe_open((folder or self.folder) / fname, "pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n)
        return out


def blocks_prefix(model: nn.Module, blocks: nn.Module) -> str:
    """The state_dict prefix of the blocks (`model.layers.` for Llama)."""
    return next(name for name, mod in model.named_modules() if mod is blocks) + "."


def _place(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` itself at a dotted parameter or buffer name (accelerate's setter copies it: twice the memory)."""
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def open_model(spec: str):
    """(model with meta blocks and a resident trunk in fp32, tokenizer, Checkpoint, block prefix)."""
    from ..models import adapter_for
    from ..models.loading import load_config, load_tokenizer, resolve_model
    from .hostplan import meta_model, return_freed_memory

    source = resolve_model(spec)
    if source.gguf_file:
        raise UserError(f"{spec} is a GGUF file; streaming reads a Hugging Face folder of safetensors: "
                        "convert it once, or raise --max-host-memory so the model loads whole")
    return_freed_memory()  # the run is about its budget (hostplan.freed_memory_returned)
    config = load_config(source)
    adapter = adapter_for(config)
    checkpoint = Checkpoint(source.location)
    model = meta_model(config)
    model.eval().requires_grad_(False)
    if model.can_generate():  # the generation config as from_pretrained reads it (the file, else config.json)
        model.adjust_generation_fn(None, True, False, source.location, cache_dir=None, force_download=False,
                                   proxies=None, local_files_only=True, token=None, revision=None, subfolder="",
                                   trust_remote_code=False)
    blocks = adapter.blocks(model)
    prefix = blocks_prefix(model, blocks)
    state = model.state_dict()
    for i, block in enumerate(blocks):
        missing = [k for k in block.state_dict() if f"{prefix}{i}.{k}" not in checkpoint.where]
        if missing:
            raise UserError(f"{spec}: block {i}'s tensors are not stored under the model's own names "
                            f"({prefix}{i}.{missing[0]} is missing), so blocks cannot be read one at a time; "
                            "raise --max-host-memory so the model loads whole")
    trunk = [k for k in state if not k.startswith(prefix) and k in checkpoint.where]
    for name, value in checkpoint.read(trunk).items():
        _place(model, name, value.to(torch.float32) if value.is_floating_point() else value)
    model.tie_weights()
    left = [k for k, v in model.state_dict().items() if not k.startswith(prefix) and v.device.type == "meta"]
    if left:
        raise UserError(f"{spec}: the checkpoint lacks {left[0]}; restore the model folder")
    return model, load_tokenizer(source), checkpoint, prefix


class StreamedBlocks:
    """Each block's master copy in memory only while it is held; changed blocks kept as files in `folder`."""

    def __init__(self, checkpoint: Checkpoint, prefix: str, blocks: nn.ModuleList, folder: Path):
        self.checkpoint, self.prefix, self.folder = checkpoint, prefix, Path(folder)
        self.origin = {block: i for i, block in enumerate(blocks)}  # block -> original index
        self.files: dict[int, str] = {}  # original index -> the file holding its changed weights
        self._holds: dict[nn.Module, int] = {}

    # -- reading ----------------------------------------------------------------
    def read(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's state_dict in fp32, from its changed file or the checkpoint."""
        orig = self.origin[block]
        names = list(block.state_dict())
        if orig in self.files:
            try:
                return self.checkpoint.read(names, folder=self.folder, file=self.files[orig])
            except Exception:  # noqa: BLE001 - safetensors refuses anything but its own format, in many types
                raise UserError(f"the saved state at {self.folder} has an unreadable block file "
                                f"({self.files[orig]}); use --force to start over") from None
        got = self.checkpoint.read([f"{self.prefix}{orig}.{n}" for n in names])
        out = {}
        for n in names:
            t = got.pop(f"{self.prefix}{orig}.{n}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"the model holds NaN or Inf weights ({self.prefix}{orig}.{n}); "
                                "it cannot be compressed")
            out[n] = t.to(torch.float32) if t.is_floating_point() else t
        return out

    # -- holding ----------------------------------------------------------------
    def acquire(self, block: nn.Module) -> None:
        count = self._holds.get(block, 0)
        if count == 0:
            for name, value in self.read(block).items():
                _place(block, name, value)
        self._holds[block] = count + 1

    def release(self, block: nn.Module) -> None:
        count = self._holds[block] - 1
        if count:
            self._holds[block] = count
            return
        del self._holds[block]
        for mod in block.modules():
            for leaf, prm in list(mod._parameters.items()):
                if prm is not None:
                    mod._parameters[leaf] = nn.Parameter(torch.empty_like(prm, device="meta"), requires_grad=False)

    @property
    def held(self) -> int:
        return len(self._holds)

    # -- writing ----------------------------------------------------------------
    def save(self, block: nn.Module, version: int) -> None:
        """Keep a held block's current weights as its source from now on (file named by iteration)."""
        from safetensors.torch import save_file

        from .state import _atomic_write

        orig = self.origin[block]
        name = BLOCK_FILE.format(orig=orig, version=version)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / name, lambda tmp: save_file(tensors, tmp))
        self.files[orig] = name
