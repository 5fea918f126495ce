"""What both exporters share: resolving the input, provenance, atomic output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fusedeploy import __version__
from fusedeploy.errors import UserError
from fusedeploy.outputs import apply_umask, check_replaceable
from fusedeploy.models.loading import ModelSource, resolve_model


def resolve_local(model: str | os.PathLike) -> ModelSource:
    """The Hugging Face folder to export (a local folder, a built-in name or a Hub model); .gguf inputs are refused."""
    source = resolve_model(str(model))
    if source.gguf_file:
        raise UserError(f"export reads a Hugging Face folder, not a .gguf file ({model}); "
                        "convert it first or pass the folder it came from")
    return source


def provenance(model_dir: str | os.PathLike, spec: str | None = None) -> dict[str, str | list[int]]:
    """FuseDeploy provenance: source model, and the compression record if the folder has one."""
    folder = Path(model_dir)
    out: dict[str, str | list[int]] = {"version": __version__, "source_model": spec or str(folder)}
    record_path = folder / "compression.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{record_path} is not valid JSON ({exc}); fix or remove it") from None
        out["method"] = str(record.get("method", "unknown"))
        out["removed_blocks"] = [int(i) for i in record.get("removed_blocks", [])]
        settings = record.get("settings", {})
        out["settings_hash"] = hashlib.sha256(
            json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    else:
        out["method"] = "none"
        out["removed_blocks"] = []
    return out


def check_overwrite(out: Path, force: bool) -> None:
    """An existing output is replaced only with `force`, and only if FuseDeploy made it."""
    check_replaceable(out, force)


@contextlib.contextmanager
def atomic_path(out: Path, is_dir: bool = False):
    """Yield a temporary sibling of `out`; on success replace `out` with it, on failure remove it.

    A killed export leaves only a dot-prefixed `.name.tmp-*` entry, never
    something at `out` that looks finished.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    apply_umask(tmp)  # tempfile creates 0700/0600; an output gets the user's umask
    try:
        yield tmp
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def set_metadata_props(model, meta: dict[str, str]) -> None:
    """Write `meta` into an ONNX model's metadata_props, replacing keys that are already there."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


# Token ids the smoke run feeds: low ids exist in every vocabulary.
SMOKE_IDS = [1, 2, 3, 4]


def smoke_check(runtime, path: Path, what: str) -> None:
    """Load the artifact in its own runtime and run one short forward pass before it is declared written.

    An exporter that exits 0 with a file its runtime cannot load is the failure
    FuseDeploy exists to prevent; this is that check, not the full verify.
    """
    import numpy as np

    backend = None
    try:
        backend = runtime.backend_class()(path, n_ctx=16, n_threads=None, logits_all=True)
        logits = backend.logits(SMOKE_IDS)
    except UserError as exc:
        raise UserError(f"the {what} does not run in {runtime.name} ({exc}); nothing was written") from None
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types for graphs they cannot run
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"the {what} does not run in {runtime.name} ({why}); nothing was written") from None
    finally:
        if backend is not None and hasattr(backend, "close"):
            backend.close()
    if logits.shape[0] != len(SMOKE_IDS) or not np.isfinite(logits).all():
        raise UserError(f"the {what} runs in {runtime.name} but gives non-finite or misshapen logits "
                        f"{tuple(logits.shape)}; nothing was written")
