"""The resumable state of a compression run: JSON for the facts, safetensors for the weights.

Nothing here is unpickled: a state folder is data another person may have planted, and a pickle
runs code on load. `state.json` is read and its fingerprint compared with the run's before any
tensor is touched; the weights are read with safetensors, which only ever yields tensors.

Crash safety: the weights of the k-th completed iteration go to `blocks-<k>.safetensors` first,
then `state.json` naming that file replaces the old one atomically, then older weight files go.
A kill at any point leaves a `state.json` whose weight file exists and matches it.

A state saved before the first removal (a one-shot method's plan, once a costly selection such as
fusegpt-evo's search has made it) holds no weights: the blocks are the dense model's, which the
run loads anyway. Its `weights` is null, and only a state with nothing removed may say so.
Fields added later (`search`) are read with a default, so a state written before them still loads.

A streamed run (streaming.py) never holds all blocks, so its state names one file per changed
block instead (`block_files`: original index -> `block-<index>.<iteration>.safetensors`), each
written during its iteration under a name no earlier state uses; `state.json` naming them replaces
the old one, then files no state names go. Its fingerprint says `streamed`, so neither kind of
run resumes the other's state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import UserError

VERSION = 2
STATE_FILE = "state.json"


def normalized(obj):
    """The value as it reads back from JSON (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(obj))


def differences(saved, now, where: str = "") -> list[str]:
    """Which fingerprint entries changed, named as a user can act on them (`dtype`, `settings.seed`):
    a refusal that only says "different" leaves the user guessing which option to put back."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for key in sorted(set(saved) | set(now), key=str)
                for d in differences(saved.get(key), now.get(key), f"{where}{key}.")]
    if saved == now:
        return []
    return [f"{where.rstrip('.') or 'fingerprint'}: saved {saved}, now {now}"]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(folder: Path, facts: dict, blocks: dict[str, torch.Tensor] | None,
         block_files: dict[int, str] | None = None) -> None:
    """Write one completed iteration's state; `facts` must be JSON (it carries `removed`).

    `blocks` None: nothing removed yet, the blocks are the dense model's and no weights are written.
    `block_files`: a streamed run's changed blocks, already written in `folder`.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if block_files is not None:
        weights = None
        facts = {**facts, "block_files": {str(k): v for k, v in sorted(block_files.items())}}
    elif blocks is None:
        if facts["removed"]:
            raise ValueError("a state after a removal must hold the blocks' weights")
        weights = None
    else:
        weights = f"blocks-{len(facts['removed'])}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in blocks.items()}
        _atomic_write(folder / weights, lambda tmp: save_file(tensors, tmp))
    record = {"version": VERSION, "weights": weights, **facts}
    _atomic_write(folder / STATE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    named = set((block_files or {}).values())
    for old in [*folder.glob("blocks-*.safetensors"), *folder.glob("block-*.*.safetensors")]:
        if old.name != weights and old.name not in named:
            old.unlink(missing_ok=True)


def exists(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def streamed(folder: Path) -> bool | None:
    """Whether a saved run streamed its blocks (None: unreadable; `load` reports that in its words)."""
    try:
        facts = json.loads((folder / STATE_FILE).read_text())
        return bool(facts["fingerprint"].get("streamed", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load(folder: Path, fingerprint: dict) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(facts, block weights) of a saved run, only if it is the same run (same fingerprint).

    The weights are None for a state saved before the first removal (the dense model's blocks).
    """
    from safetensors.torch import load_file

    try:
        facts = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the saved state at {folder} is unreadable ({type(exc).__name__}); "
                        "use --force to start over") from None
    if not isinstance(facts, dict) or facts.get("version") != VERSION:
        raise UserError(f"the saved state at {folder} is from a different run (another state format); "
                        "use --force to start over")
    if facts.get("fingerprint") != normalized(fingerprint):
        changed = differences(facts.get("fingerprint"), normalized(fingerprint))
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"the saved state at {folder} is from a different run ({shown}); "
                        "run again with the saved run's options to resume it, or use --force to start over")
    if "block_files" in facts:  # a streamed run's: each named file must be there
        files = facts["block_files"]
        if not isinstance(files, dict) or not all(
                k.isdigit() and isinstance(v, str) and (folder / v).parent == folder and (folder / v).is_file()
                for k, v in files.items()):
            raise UserError(f"the saved state at {folder} lacks its block files; use --force to start over")
        return facts, None
    if facts.get("weights", "") is None and facts.get("removed") == []:
        return facts, None
    weights = folder / str(facts.get("weights", ""))
    if weights.parent != folder or not weights.is_file():
        raise UserError(f"the saved state at {folder} lacks its weights file; use --force to start over")
    try:
        return facts, load_file(weights)
    except Exception as exc:  # safetensors refuses anything but its own format
        raise UserError(f"the saved state at {folder} has unreadable weights ({type(exc).__name__}); "
                        "use --force to start over") from None
