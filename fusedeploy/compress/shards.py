"""A Hugging Face checkpoint written tensor by tensor, for a model that is never whole in memory.

`save_pretrained` and safetensors' `save_file` serialize a shard from tensors that are all in
memory at once; a streamed model (streaming.py) has one block at a time. The safetensors format
is specified and small -- an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then the raw data -- so
each shard's header is written first from the tensors' shapes and every tensor is then written
at its offset when its block is in memory. Shards are planned with huggingface_hub's splitter
and transformers' own default shard size, file names and index layout, so the files equal what
`save_pretrained` writes for the same weights, byte for byte (tests/test_compress_streaming.py
compares them).
"""

from __future__ import annotations

import inspect
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names (its format specification)
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint to write: its dtype and shape, known before its data is."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _default_shard_size():
    """The shard size `save_pretrained` uses when not told (transformers owns the number)."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def _header(entries: dict[str, Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The shard's header bytes and each tensor's data offset, as safetensors lays them out:
    tensors ordered by alignment (largest first), then by name."""
    order = sorted(entries, key=lambda n: (-entries[n].itemsize, n))
    header: dict = {"__metadata__": metadata}
    offsets, pos = {}, 0
    for name in order:
        e = entries[name]
        header[name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        offsets[name] = pos
        pos += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class ShardedWriter:
    """Write `entries` (name -> Entry, in the model's state_dict order) into `folder` as shards + index.

    Use: `with ShardedWriter(folder, entries, total_parameters) as w: w.put(name, tensor) ...`; every
    entry must be put exactly once before the block ends, or the checkpoint is refused.
    """

    def __init__(self, folder: Path, entries: dict[str, Entry], total_parameters: int,
                 max_shard_size: int | str | None = None):
        from huggingface_hub import split_state_dict_into_shards_factory
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

        self.folder, self.entries = Path(folder), entries
        pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
        self.split = split_state_dict_into_shards_factory(entries, get_storage_size=lambda e: e.nbytes,
                                                          filename_pattern=pattern,
                                                          max_shard_size=max_shard_size or _default_shard_size())
        self.index_name, self.total_parameters = SAFE_WEIGHTS_INDEX_NAME, total_parameters
        self._where: dict[str, tuple[str, int]] = {}
        self._files: dict[str, object] = {}
        self._left = set(entries)

    def __enter__(self) -> ShardedWriter:
        for filename, names in self.split.filename_to_tensors.items():
            head, offsets = _header({n: self.entries[n] for n in names}, {"format": "pt"})
            f = open(self.folder / filename, "wb")  # noqa: SIM115 - closed in __exit__
            self._files[filename] = f
            f.write(head)
            f.truncate(len(head) + sum(self.entries[n].nbytes for n in names))
            for n in names:
                self._where[n] = (filename, len(head) + offsets[n])
        return self

    def put(self, name: str, tensor: torch.Tensor) -> None:
        e = self.entries[name]
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {e.dtype} {e.shape}")
        filename, offset = self._where[name]
        f = self._files[filename]
        f.seek(offset)
        f.write(memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._left.discard(name)

    def __exit__(self, kind, exc, tb) -> None:
        for f in self._files.values():
            f.close()
        if kind is not None:
            return
        if self._left:
            raise RuntimeError(f"checkpoint incomplete: {len(self._left)} tensors never written "
                               f"({', '.join(sorted(self._left)[:3])})")
        if self.split.is_sharded:  # the index exactly as save_pretrained writes it
            index = {"metadata": {"total_parameters": self.total_parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                      encoding="utf-8")


def entries_of(state: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entry]:
    return {name: Entry(t.dtype, tuple(t.shape)) for name, t in state}
