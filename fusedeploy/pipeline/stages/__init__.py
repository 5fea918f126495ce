"""The stages of a build and the resumable runner that runs them; each stage owns one folder of the build.

One module per stage (plan, compress, curve, export, verify, tasks, profile, report), each
declaring, as an Olive pass does, a frozen `Config`, the names of the `INPUTS` it reads, and
`run(config, inputs, workdir) -> outputs`. `run_declared` keys the stage on (its name, the
config, the digests of its inputs) and hands `run` those and nothing else: what a stage reads is
what its key holds, so a stale key cannot come from forgetting to list a setting. Progress
messages and the host-memory budget, which change no output (a streamed compression writes the
very checkpoint an in-memory one does), reach a stage through `say` / `compress_progress` /
`host_memory`.

A stage is finished when `<build>/<name>/manifest.json` exists. Work happens
in `<build>/<name>.partial/`, which is kept across interruptions (so a stage
that saves its own progress, such as compression, can resume) and wiped only
when the stage's key -- its settings and the content of its inputs -- changes.
The finished folder replaces an older one only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from ... import outputs
from ...errors import UserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def input_digest(path: Path) -> str:
    """An earlier stage's folder is identified by its manifest's key; anything else by content."""
    manifest = path / MANIFEST
    if manifest.is_file():
        return "stage:" + json.loads(manifest.read_text())["key"]
    return file_digest(path)


@dataclass
class Stage:
    name: str
    run: Callable[[Path], dict]  # does the work inside the given folder; returns its outputs
    settings: dict = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    writes: tuple[str, ...] = ("*",)  # names `run` may write in its folder (glob patterns)

    def key(self) -> str:
        digests = {k: input_digest(Path(v)) for k, v in sorted(self.inputs.items())}
        blob = json.dumps({"stage": self.name, "settings": self.settings, "inputs": digests},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def run_stage(build_dir: Path, stage: Stage) -> dict:
    """Run a stage unless a finished one with the same key exists; returns its manifest."""
    build_dir.mkdir(parents=True, exist_ok=True)
    final = build_dir / stage.name
    key = stage.key()
    manifest_path = final / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key and manifest.get("status") == "complete":
            log.info("stage %s unchanged; skipped", stage.name)
            return {**manifest, "skipped": True}
    _refuse_foreign(final, stage.writes)  # the finished folder this run would replace, checked before any work
    partial = build_dir / f"{stage.name}.partial"
    key_file = partial / ".key"
    if _finished_partial(partial, key):  # killed between finishing and the final rename
        return {**_promote(build_dir, stage.name, partial), "skipped": False}
    if partial.exists() and (not key_file.is_file() or key_file.read_text() != key):
        _refuse_foreign(partial, stage.writes)
        shutil.rmtree(partial)
    resumed = partial.exists()
    partial.mkdir(exist_ok=True)
    key_file.write_text(key)
    started = time.time()
    made = stage.run(partial)
    manifest = {
        "stage": stage.name, "status": "complete", "key": key, "settings": stage.settings,
        "inputs": {k: relative_to_build(Path(v), build_dir) for k, v in stage.inputs.items()},
        "input_digests": {k: input_digest(Path(v)) for k, v in stage.inputs.items()},
        "outputs": made, "resumed": resumed,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
    }
    key_file.unlink()
    tmp_manifest = partial / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp_manifest, partial / MANIFEST)
    return {**_promote(build_dir, stage.name, partial), "skipped": False}


def relative_to_build(path: Path, root: Path) -> str:
    """Recorded relative to the build folder when inside it, so a moved build still reads right."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _finished_partial(partial: Path, key: str) -> bool:
    try:
        manifest = json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("key") == key and manifest.get("status") == "complete"


def _refuse_foreign(folder: Path, writes: tuple[str, ...]) -> None:
    """A stage folder about to be wiped or replaced holds only what the runner and its stage write."""
    foreign = outputs.foreign_in_stage(folder, writes)
    if foreign:
        raise UserError(f"{folder} holds files FuseDeploy did not write ({', '.join(foreign[:3])}); "
                        "move them away and run again")


def _promote(build_dir: Path, name: str, partial: Path) -> dict:
    """Swap a finished `.partial` into place; the older finished folder goes only after."""
    final = build_dir / name
    if final.exists():
        old = build_dir / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    return json.loads((final / MANIFEST).read_text())


# ---------------------------------------------------------------- declared stages


@dataclass(frozen=True)
class Upstream:
    """An earlier stage's folder handed to a stage as an input: where it is and its manifest.

    `skipped` says whether this build found it finished (True) or ran it (False); it changes no output.
    """

    path: Path
    manifest: dict

    @property
    def outputs(self) -> dict:
        return self.manifest["outputs"]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def skipped(self) -> bool:
        return bool(self.manifest.get("skipped", False))


def run_declared(build_dir: Path, module: ModuleType, config, inputs: dict[str, Path | dict]) -> dict:
    """Run stage `module` (NAME, Config, INPUTS, run) on `config` and `inputs`; returns its manifest.

    An input is a path (a model, a text file, a folder) or an earlier stage's manifest as `run_declared`
    returned it; `run` gets the latter as an `Upstream`. The key is today's `Stage.key`: the stage's
    name, `asdict(config)` and the digests of the inputs' paths.
    """
    if not isinstance(config, module.Config):
        raise TypeError(f"stage {module.NAME} takes a {module.Config.__name__}, not {type(config).__name__}")
    unknown = set(inputs) - set(module.INPUTS)
    if unknown:
        raise TypeError(f"stage {module.NAME} declares no input {sorted(unknown)}")
    paths = {name: build_dir / v["stage"] if isinstance(v, dict) else Path(v) for name, v in inputs.items()}
    handed = {name: Upstream(paths[name], v) if isinstance(v, dict) else Path(v) for name, v in inputs.items()}
    return run_stage(build_dir, Stage(module.NAME, lambda work: module.run(config, handed, work), asdict(config),
                                      paths, module.WRITES))


_say: ContextVar[Callable[[str], None]] = ContextVar("say", default=lambda msg: log.info(msg))
_compress_progress: ContextVar[Callable | None] = ContextVar("compress_progress", default=None)
_host_memory: ContextVar[float | None] = ContextVar("host_memory", default=None)


def say(message: str) -> None:
    """Announce a step of the running stage (the CLI prints it; a library caller may log it)."""
    _say.get()(message)


def compress_progress() -> Callable | None:
    """The compression progress callback the build was given, if any."""
    return _compress_progress.get()


def host_memory() -> float | None:
    """GB of host memory the build's compression may use (`--max-host-memory`; None: the machine's)."""
    return _host_memory.get()


@contextmanager
def announcing(say_: Callable[[str], None], compress_progress_: Callable | None,
               host_memory_: float | None = None) -> Iterator[None]:
    tokens = _say.set(say_), _compress_progress.set(compress_progress_), _host_memory.set(host_memory_)
    try:
        yield
    finally:
        _say.reset(tokens[0])
        _compress_progress.reset(tokens[1])
        _host_memory.reset(tokens[2])


def model_folder(model: Path) -> Path:
    """The folder of a model input: the input itself, or the folder holding a GGUF file."""
    return model.parent if model.suffix == ".gguf" else model


def in_build(root: Path, recorded: str) -> Path:
    """A path recorded by `relative_to_build`: relative to the build folder, or absolute."""
    return Path(recorded) if Path(recorded).is_absolute() else root / recorded
