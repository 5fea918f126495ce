"""Checks that run before any compute: inputs readable, outputs writable, room on the disk.

A compression that dies on a read-only folder after its first iteration
wastes the user's time; these checks fail in a second, with the path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .textfiles import read_utf8

HEADROOM = 1.1  # free space wanted beyond the estimate: filesystem overhead, metadata


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_path_length(path: str | os.PathLike) -> None:
    """Each name within the file system's name limit and the whole path within its path limit."""
    p = Path(path).expanduser()
    name_max, path_max = 255, 4096
    try:
        name_max = os.pathconf("/", "PC_NAME_MAX")
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        pass
    long = next((part for part in p.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise UserError(f"the name {long[:40]}... in {str(p)[:80]}... is longer than the file system allows "
                        f"({name_max} bytes); use a shorter path")
    if len(os.fsencode(str(p.absolute()))) >= path_max:
        raise UserError(f"the path {str(p)[:80]}... is longer than the file system allows ({path_max} bytes); "
                        "use a shorter path")


def check_readable(path: str | os.PathLike | None) -> None:
    """An input that exists on disk must be readable (a folder: listable, its files readable)."""
    if path is None:
        return
    p = Path(path).expanduser()
    check_path_length(p)
    if not p.exists():
        return  # not a path (a built-in name, a Hub id, a dataset name): resolved elsewhere
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"cannot read the folder {p}: permission denied")
        files = [f for f in p.iterdir() if f.is_file()]
    else:
        files = [p]
    for f in files:
        try:
            with f.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise UserError(f"cannot read {f}: {exc.strerror or exc}") from None


def _existing_ancestor(p: Path) -> Path:
    for candidate in (p, *p.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_writable(out: str | os.PathLike, need_bytes: float = 0, folder: bool = False,
                   flag: str = "--out") -> None:
    """`out` can be created (or replaced) and its folder has room for about `need_bytes`."""
    p = Path(out).expanduser()
    check_path_length(p)
    if folder and p.is_file():
        raise UserError(f"{flag} {out} is a file; give a folder")
    base = _existing_ancestor(p.parent if not p.is_dir() else p)
    if not base.is_dir():
        raise UserError(f"{flag} {out} cannot be created: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fusedeploy-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to {base}: {exc.strerror or exc}; choose a writable {flag}") from None
    if need_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < need_bytes * HEADROOM:
            raise UserError(f"{base} has {human_bytes(free)} free, but the output needs about {human_bytes(need_bytes)}; "
                            f"free some space or choose another {flag}")


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of weight files in a model folder: the scale of every output made from it."""
    folder = Path(model_dir)
    if folder.is_file():
        return folder.stat().st_size
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".onnx_data"))


def check_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """Read a YAML file that must be a UTF-8 mapping; a one-line error otherwise."""
    import yaml

    p = Path(path).expanduser()
    check_path_length(p)
    if not p.is_file():
        raise UserError(f"{what} not found: {path}")
    text = read_utf8(p, f"{what} {path}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping (name: value) at the top level")
    return data


def model_location(spec: str) -> Path:
    """The local folder (or .gguf file) behind a --model value (a Hub model's cache snapshot)."""
    from .models.loading import resolve_model

    check_path_length(spec)
    source = resolve_model(spec)
    folder = Path(source.location)
    return folder / source.gguf_file if source.gguf_file else folder


def prepare_output(out: str | os.PathLike, force: bool, inputs: list, need_bytes: float = 0,
                   folder: bool = False, force_flag: str | None = "--force") -> None:
    """Everything an output must pass before compute: readable inputs, separate, ours to replace, writable."""
    from . import outputs

    check_path_length(out)
    for item in inputs:
        check_readable(item)
    outputs.check_separate(out, inputs)
    if folder and Path(out).expanduser().is_file() and not outputs.is_ours(out):
        raise UserError(f"--out {out} is a file; give a folder")
    outputs.check_replaceable(out, force, force_flag)
    check_writable(out, need_bytes, folder=False)


def check_text_source(spec: str, purpose: str, flag: str) -> str:
    """The text of a source named by `flag`, refused in one line when it holds no text at all."""
    from .data import load_text

    text = load_text(spec, purpose=purpose)
    if not text.strip():
        raise UserError(f"{flag} {spec} holds no text; give a file (or folder) with text in it")
    return text
