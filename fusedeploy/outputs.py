"""Ownership of outputs: FuseDeploy replaces or deletes only what it made.

Every output carries proof of origin: a folder holds a `.fusedeploy` marker
file, a GGUF file carries `fusedeploy.*` metadata, an ONNX model
`fusedeploy.*` metadata props, a compressed checkpoint its compression.json.
Anything else at an output path is the user's, and no flag replaces it.

Callers, before any compute:
    check_separate(out, inputs)      # output neither equals, sits inside nor contains an input
    check_replaceable(out, force)    # nothing, an empty folder, or ours (+ --force)
    with claim(out): ...             # one writer per output; stale temporaries of ours removed
and after the final rename:
    mark(out, kind)                  # stamp a folder as ours, with the user's umask mode
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from .errors import UserError

MARKER = ".fusedeploy"
# Names of temporaries FuseDeploy writes beside an output `name`: atomic writes
# (.name.tmp-*), swapped-out old versions (.name.old-*), the compress driver's
# (.name.*.tmp / .name.*.old), and the per-output lock.
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part
_TEMP_NAME = re.compile(rf"(tmp-(f32-|onnx-|genai-)?{_RANDOM}|old-\d+|{_RANDOM}\.(tmp|old))")


def umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain create would: tempfile makes 0700 folders and 0600 files."""
    p = Path(path)
    if p.is_symlink() or not p.exists():
        return
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~umask())


def _write_marker(folder: Path, kind: str) -> None:
    from . import __version__

    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"made_by": "fusedeploy", "kind": kind, "version": __version__}) + "\n")
    os.replace(tmp, folder / MARKER)


def mark(path: str | os.PathLike, kind: str) -> None:
    """Stamp a finished output as FuseDeploy's and give it the user's umask mode.

    A folder gets a `.fusedeploy` marker file; a file (GGUF) already carries
    `fusedeploy.*` metadata, so only its mode is fixed.
    """
    p = Path(path)
    if secondary_rank():
        return
    if p.is_dir():
        _write_marker(p, kind)
    apply_umask(p)


def _gguf_is_ours(path: Path) -> bool:
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        return any(name.startswith("fusedeploy.") for name in reader.fields)
    except Exception:  # noqa: BLE001 - an unreadable or foreign file is not ours
        return False


def _onnx_is_ours(model_file: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        return any(p.key.startswith("fusedeploy.") for p in model.metadata_props)
    except Exception:  # noqa: BLE001
        return False


def _compressed_is_ours(folder: Path) -> bool:
    try:
        record = json.loads((folder / "compression.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "fusedeploy_version" in record


def is_ours(path: str | os.PathLike) -> bool:
    """True when FuseDeploy made `path` (a marker, or FuseDeploy provenance in the artifact itself)."""
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_dir():
        if (p / MARKER).is_file():
            return True
        if (p / "model.onnx").is_file() and _onnx_is_ours(p / "model.onnx"):
            return True
        return _compressed_is_ours(p)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_is_ours(p)
    return False


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def check_replaceable(path: str | os.PathLike, force: bool, force_flag: str | None = "--force") -> None:
    """Refuse to replace anything that is not ours; refuse ours too without `force`.

    `force_flag` is the flag the calling command offers for replacing (None:
    it offers none, so the message advises only another output path).
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    if _is_empty_dir(p):  # nothing to lose, but an existing path is still replaced only on request
        if force:
            return
    elif not is_ours(p):
        what = "folder" if p.is_dir() else "file"
        raise UserError(f"{p} is a {what} FuseDeploy did not make; it is never replaced -- "
                        "choose another output path or move it away")
    if not force:
        hint = f"pass {force_flag} to replace it" if force_flag else "choose another output path"
        raise UserError(f"{p} already exists; {hint}")


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve(strict=False)


def check_separate(out: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """Refuse an output equal to, inside, or containing an existing local input path."""
    o = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        path = Path(item).expanduser()
        try:
            if not path.exists():
                continue
        except OSError:
            continue
        i = path.resolve()
        if o == i:
            raise UserError(f"the output {out} is the input {item} itself; write the output somewhere else")
        if i in o.parents:
            raise UserError(f"the output {out} is inside the input {item}; write the output somewhere else")
        if o in i.parents:
            raise UserError(f"the output {out} contains the input {item}; write the output somewhere else")


def stale_temporaries(out: Path) -> list[Path]:
    """Leftovers of killed writes of `out`: hidden siblings named after it (`.name.tmp-*`, `.name.*.old` ...)."""
    parent, prefix = out.parent, f".{out.name}."
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        name = entry.name
        if name.startswith(prefix) and _TEMP_NAME.fullmatch(name[len(prefix):]):
            found.append(entry)
    return found


def remove_entry(entry: Path) -> None:
    """A file, link or folder of ours, gone (a link is removed, never followed)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


_HELD: set[str] = set()  # lock files this process holds


def secondary_rank() -> bool:
    """A torch.distributed worker other than rank 0: it shares rank 0's claim, leaves marking and
    error lines to it (every rank meets the same user error; one line is enough)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


@contextlib.contextmanager
def claim(out: str | os.PathLike):
    """Hold `out` for one writer (a lock beside it) and clear our stale temporaries first.

    The lock makes it safe to delete `.name.tmp-*` leftovers: no live writer
    of this output can own them. A second concurrent writer gets a one-line error.
    Folders created here for the output are removed again if no output appears.
    """
    o = Path(out)
    created = [p for p in (o.parent, *o.parent.parents) if not p.exists()]  # deepest first
    o.parent.mkdir(parents=True, exist_ok=True)
    lock_path = o.parent / f".{o.name}.lock"
    held = str(lock_path.resolve())
    if held in _HELD or secondary_rank():  # reentrant: the CLI and the library may both claim the same output
        yield o
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"another FuseDeploy run is writing {o}; wait for it to finish") from None
            raise
        _HELD.add(held)
        for entry in stale_temporaries(o):
            remove_entry(entry)
        yield o
    finally:
        if held in _HELD:
            _HELD.discard(held)
            with contextlib.suppress(OSError):
                lock_path.unlink()
        os.close(fd)
        if not o.exists():
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


STAGE_RUNNER_FILES = frozenset({".key", "manifest.json", "manifest.json.tmp"})  # the stage runner's own


def foreign_in_stage(folder: Path, writes: tuple[str, ...]) -> list[str]:
    """Names at the top of a stage's folder that neither the runner nor the stage writes.

    `writes` are the stage's declared names (glob patterns); each brings its atomic-write and lock
    siblings (`name.tmp`, `.name.*`). A stage folder is replaced or wiped only when this is empty.
    """
    if not folder.is_dir() or folder.is_symlink():
        return []
    allowed = [w for p in writes for w in (p, p + ".tmp", f".{p}.*")]
    return sorted(e.name for e in folder.iterdir()
                  if e.name not in STAGE_RUNNER_FILES and not any(fnmatch.fnmatchcase(e.name, w) for w in allowed))


def _build_entries(stages: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Names a build folder of ours may hold, each with what may lie in it: stage folders, their
    `.partial` work, swapped-out olds (each the stage's writes), and the marker."""
    names: dict[str, tuple[str, ...]] = {MARKER: (), MARKER + ".tmp": ()}
    for s, writes in stages.items():
        names |= {s: writes, f"{s}.partial": writes, f".{s}.old": writes}
    return names


def _looks_like_our_build(folder: Path, stages: Mapping[str, tuple[str, ...]]) -> bool:
    """An unmarked folder from before markers existed: only build entries, each stage folder with its manifest."""
    found_stage = False
    for entry in folder.iterdir():
        if entry.name not in _build_entries(stages):
            return False
        if entry.name in stages:
            try:
                manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            if not isinstance(manifest, dict) or manifest.get("stage") != entry.name:
                return False
            found_stage = True
    return found_stage


def _foreign_in_build(o: Path, stages: Mapping[str, tuple[str, ...]]) -> list[str]:
    entries = _build_entries(stages)
    foreign = []
    for e in sorted(o.iterdir()):
        if e.name not in entries or (e.name in stages and not (e / "manifest.json").is_file()):
            foreign.append(e.name)
        elif e.is_dir() and not e.is_symlink():
            foreign += [f"{e.name}/{n}" for n in foreign_in_stage(e, entries[e.name])]
    return foreign


def claim_build_folder(out: str | os.PathLike, stages: Mapping[str, tuple[str, ...]], force: bool = False) -> Path:
    """Make `out` a build folder of ours, or refuse in one line; `force` empties an old build of ours.

    `stages` maps each stage's name to the names it writes in its folder. A new or empty folder is
    marked; a marked one (or one that is plainly an older build) is resumed. A folder holding
    anything FuseDeploy did not make -- at its top or inside a stage's folder, including folders
    that merely share a stage's name -- is refused, so no stage ever replaces the user's files.
    """
    o = Path(out)
    if o.is_file() or o.is_symlink():
        raise UserError(f"--out {out} is a file; give a folder for the build")
    if o.is_dir() and any(o.iterdir()):
        ours = (o / MARKER).is_file() or _looks_like_our_build(o, stages)
        foreign = _foreign_in_build(o, stages)
        if not ours or foreign:
            shown = ", ".join(foreign[:3] or sorted(e.name for e in o.iterdir())[:3])
            raise UserError(f"--out {out} holds files FuseDeploy did not make ({shown}); "
                            "give a new or empty folder, or move those files away")
        if force:
            for entry in o.iterdir():
                if entry.name != MARKER:
                    remove_entry(entry)
    o.mkdir(parents=True, exist_ok=True)
    mark(o, "build")
    return o
