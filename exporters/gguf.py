"""Hugging Face checkpoint -> GGUF file for llama.cpp, converted by llama.cpp's own converter.

llama.cpp's `convert_hf_to_gguf.py` (installed from the runtime's own sdist,
see `llama_converter.py`) writes the tensors, hyperparameters, RoPE scaling
and tokenizer; it knows every family llama.cpp runs. What stays here is what
no converter does for FuseDeploy:

- a model whose float checkpoint came from a GGUF file (the built-in
  SmolLM2, and every folder derived from it) keeps that file's `tokenizer.*`
  keys, because the tokenizer.json transformers rebuilds from a GGUF is not
  one llama.cpp's converter reads correctly;
- per-block facts the converter does not write, taken from the config of the
  model as it is after block removal (Gemma 3's per-block sliding-window
  pattern: without it llama.cpp assumes "every 6th block is global"), and a
  check that every per-block fact in the file matches the block count;
- provenance keys (`fusedeploy.*`);
- a tokenization check after conversion: llama.cpp must tokenize a probe
  text exactly as the tokenizer the model was trained with (the folder's
  SentencePiece model when llama.cpp read its vocabulary from one, else the
  Hugging Face tokenizer), or the export fails; a Hugging Face tokenizer
  that differs from the SentencePiece model is a warning;
- the importance matrix, collected with PyTorch hooks (llama-cpp-python has
  the quantizer's imatrix input but not the collecting tool), and the
  quantizer itself, `llama_model_quantize`, for the types the converter does
  not write.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fusedeploy import formats
from fusedeploy.errors import UserError

from fusedeploy.models.loading import GGUF_TOKENIZER_FILE, is_gguf_file

from .common import atomic_path, check_overwrite, provenance, resolve_local, smoke_check

log = logging.getLogger(__name__)


_PROBE = ("Hello world! It's 2024-05-17, and 12.5 million people's lives cost $3,141.59.\n\n"
          "  Indented   spaces\tand\ttabs; naïve café — “quotes” ... 東京 😀 don't WON'T we'll\n"
          "def f(x):\n    return x**2 + 1_000_000  # comment\n")

# `<arch>.*` keys that llama.cpp reads either as one value or as one value per block.
PER_BLOCK_KEYS = ("attention.sliding_window_pattern", "attention.head_count", "attention.head_count_kv",
                   "feed_forward_length")


def _load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input folder
        raise UserError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None


def _check_weights(folder: Path) -> None:
    """Every safetensors file opens (its header covers the file), before the converter reads it lazily."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise several types
            why = str(exc).splitlines()[0] if str(exc) else "corrupt file"
            raise UserError(f"cannot read the weights in {path} ({type(exc).__name__}: {why}); "
                            "is the file complete?") from None


def _tokenizer_origin(source, folder: Path) -> Path | None:
    """The GGUF file this model's tokenizer was read from, if it was read from one.

    FuseDeploy keeps that file as `tokenizer.model` in every folder it derives
    from such a model (`fusedeploy.models.loading.save_tokenizer`): compressed
    models, or tiny test models borrowing the built-in tokenizer.
    """
    if source.origin_gguf:
        return Path(source.origin_gguf)
    spm = folder / GGUF_TOKENIZER_FILE
    return spm if is_gguf_file(spm) else None


def tokenizer_keys(origin: Path, n_vocab: int) -> Path:
    """The `tokenizer.*` keys of a GGUF file as JSON [key, type, sub-type, value], cached by content hash.

    Reading them takes gguf-py's reader seconds per 50k-token vocabulary (a
    numpy view per string), on every export of a GGUF-sourced model; the
    JSON copy reads in milliseconds.
    """
    import hashlib

    import gguf

    from fusedeploy.models.loading import cache_dir

    with origin.open("rb") as f:  # every folder derived from the built-in model has its own copy
        key = hashlib.file_digest(f, "sha256").hexdigest()[:32]
    cached = cache_dir() / "gguf-tokenizers" / f"{key}.json"
    if not cached.is_file():
        reader = gguf.GGUFReader(origin)
        fields = [[name, int(f.types[0]), int(f.types[1]) if f.types[0] == gguf.GGUFValueType.ARRAY else None,
                   f.contents()] for name, f in reader.fields.items() if name.startswith("tokenizer.")]
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cached.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
            json.dump(fields, f)
        os.replace(f.name, cached)
    tokens = next((v for k, _, _, v in json.loads(cached.read_text(encoding="utf-8"))
                   if k == "tokenizer.ggml.tokens"), None)
    if tokens is None or len(tokens) != n_vocab:
        raise UserError(f"{origin} has no tokenizer for a {n_vocab}-token vocabulary "
                        f"({len(tokens) if tokens else 'no'} tokens)")
    return cached


def _extra_kv(config, meta: dict) -> list[tuple[str, str, object]]:
    """(key, kind, value) written after the converter's own keys; `{arch}` is the file's architecture."""
    from fusedeploy.models import ADAPTERS

    kv: list[tuple[str, str, object]] = [("general.source.url", "str", meta["source_model"])]
    for key, value in meta["provenance"].items():
        kv.append((f"fusedeploy.{key}", "array" if isinstance(value, list) else "str",
                   value if isinstance(value, list) else str(value)))
    kv.append(("fusedeploy.export_type", "str", meta["export_type"]))
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None:  # per-block facts the converter leaves out, from the config after removal
        for key, value in adapter.gguf_extra_metadata(config).items():
            kind = ("bool" if isinstance(value, bool) else "u32" if isinstance(value, int)
                    else "f32" if isinstance(value, float) else "array")
            kv.append((f"{{arch}}.{key}", kind, value))
    return kv


def _family(config):
    """The family's adapter, or None: the GGUF exporter also serves models FuseDeploy does not compress."""
    from fusedeploy.models import ADAPTERS

    return ADAPTERS.get(getattr(config, "model_type", None))


def check_exportable(config) -> None:
    """One clear error before conversion where the adapter says llama.cpp's converter cannot take the family."""
    adapter = _family(config)
    refusal = adapter.refusal(config, "gguf") if adapter else None
    if refusal:
        raise UserError(f"cannot export {adapter.family} ({config.model_type}) to GGUF: {refusal}")


def _converter_options(config) -> dict:
    adapter = _family(config)
    return dict(adapter.gguf_converter_options) if adapter else {}


def convert_hf(folder: Path, out: Path, outtype: str, model_name: str, extra_kv, tokenizer_kv: Path | None,
               class_options: dict | None = None) -> dict:
    """Run llama.cpp's converter on `folder` into `out` (f32/f16/bf16/q8_0).

    Returns the written file's per-block facts (as `per_block_facts`), which
    the child reports from its writer, so the file need not be read again.
    """
    from .llama_converter import converter_dir, runtime_version

    conv = converter_dir()
    with tempfile.TemporaryDirectory(prefix="fusedeploy-convert-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({
            "converter": str(conv), "model_dir": str(folder), "outfile": str(out), "outtype": outtype,
            "model_name": model_name, "kv": extra_kv, "result": str(result_path), "scratch": str(Path(tmp) / "view"),
            "per_block_keys": PER_BLOCK_KEYS, "class_options": class_options or {},
            "tokenizer_kv": str(tokenizer_kv) if tokenizer_kv else None,
            "verbose": log.isEnabledFor(logging.DEBUG)}), encoding="utf-8")
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_convert_hf.py")), str(spec_path)],
                              capture_output=True, text=True)
        result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    log.debug("llama.cpp converter output:\n%s", proc.stderr)
    if result.get("ok"):
        return result["facts"]
    who = f"llama.cpp's converter (llama-cpp-python {runtime_version()})"
    if result.get("error") == "unknown-architecture":
        raise UserError(f"unsupported architecture {result['architecture']!r} in {folder}: {who} does not know it, "
                        "so it cannot be exported to GGUF")
    if result.get("error") == "exception":
        message = (result["message"].splitlines() or [""])[0]
        raise UserError(f"{who} failed on {folder}: {result['type']}: {message}")
    tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"{who} exited with status {proc.returncode}: {tail[0]}")


# ---------------------------------------------------------------- checks after conversion


def per_block_facts(path: Path) -> dict:
    """What a GGUF file says per block: {"arch", "block_count", "blocks" (indices with tensors), "arrays"}."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture").contents()
    arrays = {}
    for key in PER_BLOCK_KEYS:
        field = reader.get_field(f"{arch}.{key}")
        if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
            arrays[key] = field.contents()
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    return {"arch": arch, "block_count": int(reader.get_field(f"{arch}.block_count").contents()),
            "blocks": sorted(blocks), "arrays": arrays}


def check_per_block(facts: dict, config) -> None:
    """Every per-block fact of a converted file (`per_block_facts`) describes the model's blocks as they are now."""
    n_blocks, expected, arch = facts["block_count"], int(config.num_hidden_layers), facts["arch"]
    if n_blocks != expected or facts["blocks"] != list(range(n_blocks)):
        raise UserError(f"GGUF block_count {n_blocks} and tensors of blocks {facts['blocks']} "
                        f"do not match the model's {expected} blocks")
    for key, values in facts["arrays"].items():
        if len(values) != n_blocks:
            raise UserError(f"GGUF {arch}.{key} has {len(values)} entries for {n_blocks} blocks; "
                            "the model's config.json lists per-block values for another block count")
    layer_types = getattr(config, "layer_types", None)
    pattern = facts["arrays"].get("attention.sliding_window_pattern")
    if layer_types and pattern is not None:
        if [bool(v) for v in pattern] != [t == "sliding_attention" for t in layer_types]:
            raise UserError("the GGUF's sliding-window pattern does not match config.layer_types")


def probe_text() -> str:
    from fusedeploy.data import load_text

    return _PROBE + load_text("builtin")[:20000]


def _llama_cpp_tokenize(gguf_path: Path, text: str) -> tuple[list[int], str | None]:
    """(llama.cpp's ids for `text`, the file's `tokenizer.ggml.model`: "llama" for SentencePiece, "gpt2" ...)."""
    import contextlib
    import io

    from llama_cpp import Llama

    # llama-cpp-python prints llama.cpp's warnings about the (unused) context of a vocabulary-only
    # load to sys.stderr even when not verbose; they are kept only if the load fails.
    noise = io.StringIO()
    try:
        with contextlib.redirect_stderr(noise):
            llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    except Exception:
        sys.stderr.write(noise.getvalue())
        raise
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return ids, llm.metadata.get("tokenizer.ggml.model")
    finally:
        llm.close()


def _sentencepiece_ids(folder: Path, text: str) -> list[int] | None:
    """The folder's own SentencePiece model's ids for `text`, as llama.cpp's converter configures it; None when
    the folder has no real SentencePiece model.

    A `tokenizer.model` that starts with b"GGUF" is a GGUF copy transformers left there, not
    SentencePiece; one SentencePiece cannot parse is not a reference either. The converter takes
    the leading-space rule from an explicit `add_prefix_space` in tokenizer_config.json over the
    model's own `add_dummy_prefix`, so the reference does the same.
    """
    model = folder / "tokenizer.model"
    if not model.is_file():
        return None
    raw = model.read_bytes()
    if raw[:4] == b"GGUF":
        return None
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(raw)
        if not proto.pieces:
            return None
        try:
            explicit = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("add_prefix_space")
        except (OSError, ValueError, AttributeError):
            explicit = None
        if isinstance(explicit, bool):
            proto.normalizer_spec.add_dummy_prefix = explicit
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, SentencePiece's RuntimeError: not a SentencePiece model
        return None
    return processor.encode(text)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokenization(gguf_path: Path, folder: Path, text: str | None = None) -> None:
    """llama.cpp tokenizes `text` (default: the probe) exactly as the tokenizer the model was trained with.

    That reference is the folder's SentencePiece model when the GGUF carries a SentencePiece
    vocabulary read from a real `tokenizer.model` (llama.cpp reimplements SentencePiece, and a
    Hugging Face fast tokenizer converted from it may differ, e.g. in the leading space), else the
    Hugging Face tokenizer. A Hugging Face tokenizer that differs from the SentencePiece reference
    is a warning: the GGUF is faithful to the model, the folder's fast tokenizer is not.
    """
    from transformers import AutoTokenizer

    text = probe_text() if text is None else text
    got, vocab = _llama_cpp_tokenize(gguf_path, text)
    hf = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    spm = _sentencepiece_ids(folder, text) if vocab == "llama" else None
    if spm is not None:
        if got != spm:
            at = _first_difference(got, spm)
            raise UserError(f"llama.cpp tokenizes differently from the SentencePiece model {folder}/tokenizer.model "
                            f"(first difference at token {at}: llama.cpp {got[at:at + 4]}, SentencePiece "
                            f"{spm[at:at + 4]}); the GGUF would not be faithful")
        if hf != spm:
            at = _first_difference(hf, spm)
            log.warning("the Hugging Face tokenizer in %s tokenizes differently from its SentencePiece model "
                        "tokenizer.model (first difference at token %d: Hugging Face %s, SentencePiece %s); the "
                        "GGUF follows the SentencePiece model", folder, at, hf[at:at + 4], spm[at:at + 4])
        return
    if got != hf:
        at = _first_difference(got, hf)
        raise UserError(f"llama.cpp tokenizes differently from the Hugging Face tokenizer in {folder} "
                        f"(first difference at token {at}: llama.cpp {got[at:at + 4]}, Hugging Face "
                        f"{hf[at:at + 4]}); the GGUF would not be faithful")


# ---------------------------------------------------------------- importance matrix and quantization


IMATRIX_CTX = 512  # tokens per window of the importance-matrix text


def check_imatrix_text(source, text: str, ctx: int = IMATRIX_CTX) -> None:
    """The importance-matrix text fills at least one window, checked before the converter runs."""
    from fusedeploy.data import tokenize
    from fusedeploy.models.loading import load_tokenizer

    n = tokenize(load_tokenizer(source), text).numel() if text.strip() else 0
    if n < ctx:
        raise UserError(f"the importance-matrix text (--imatrix-data) has {n} tokens, fewer than one window of "
                        f"{ctx}; give more text")


def compute_imatrix(model, gguf_arch: str, text: str, tokenizer, ctx: int = IMATRIX_CTX,
                    max_windows: int = 16) -> dict[str, np.ndarray]:
    """Per-input-column mean of squared activations for every linear layer, keyed by GGUF name.

    This is what llama.cpp's `llama-imatrix` tool collects; llama-cpp-python
    ships the quantizer's imatrix input (`llama_model_imatrix_data`) but not
    the collecting tool, so the statistics are gathered with PyTorch hooks.
    """
    import gguf

    from fusedeploy.data import eval_windows, tokenize

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    windows = eval_windows(tokenize(tokenizer, text), ctx, max_windows)
    tmap = gguf.get_tensor_name_map(arch, int(model.config.num_hidden_layers))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gname = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            continue

        def hook(_mod, args, _out, key=gname):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sums}


def llama_cpp_quantize(src: Path, dst: Path, qtype: str, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """Quantize a GGUF file with llama.cpp's own quantizer."""
    import llama_cpp

    # llama-cpp-python routes llama.cpp's per-tensor quantize log through this logger
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG)
                                                   else logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = formats.spec(formats.LLAMA_CPP.name, qtype).llama_file_type()
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize to {qtype} (status {rc})")


# ---------------------------------------------------------------- the export


def _imatrix_for(source, gguf_arch: str, text: str) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    from fusedeploy.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32).eval()
    return compute_imatrix(model, gguf_arch, text, load_tokenizer(source))


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, qtype: str = "f16",
                imatrix_text: str | None = None, force: bool = False) -> Path:
    """Export a Hugging Face model folder (or built-in name) to a GGUF file of type `qtype`.

    f32/f16/bf16/q8_0 are written by llama.cpp's converter; q4_0/q4_k_m/
    q5_k_m/q6_k are quantized by llama.cpp's quantizer from the converter's
    f32 output, weighted by an importance matrix when `imatrix_text`
    (calibration text) is given. Returns the output path; the file appears
    only when complete and checked (per-block facts, tokenization).
    """
    qtype = qtype.lower()
    types = formats.precision_names(formats.LLAMA_CPP.name)
    if qtype not in types:
        raise UserError(f"unknown GGUF type {qtype!r}; choose from {', '.join(types)}")
    direct = formats.spec(formats.LLAMA_CPP.name, qtype).made_by == formats.LLAMA_CONVERTER
    if imatrix_text is not None and direct:
        raise UserError(f"an importance matrix only applies to llama.cpp-quantized types, not {qtype}")
    out = Path(out_file)
    check_overwrite(out, force)
    source = resolve_local(model_dir)
    folder = Path(source.location)
    t0 = time.perf_counter()
    config = _load_config(folder)
    check_exportable(config)
    _check_weights(folder)
    if imatrix_text is not None:
        check_imatrix_text(source, imatrix_text)
    meta = {"source_model": str(model_dir), "provenance": provenance(folder, str(model_dir)), "export_type": qtype}
    if imatrix_text is not None:
        meta["provenance"]["imatrix"] = "pytorch-hooks"
    name = re.sub(r"[^\w.-]+", "-", folder.name)
    origin = _tokenizer_origin(source, folder)
    tokenizer_kv = tokenizer_keys(origin, int(config.vocab_size)) if origin else None
    convert = dict(model_name=name, extra_kv=_extra_kv(config, meta), tokenizer_kv=tokenizer_kv,
                   class_options=_converter_options(config))
    with atomic_path(out) as tmp:
        if direct:
            check_per_block(convert_hf(folder, tmp, qtype, **convert), config)
            check_tokenization(tmp, folder)
        else:
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-f32-", dir=out.parent) as scratch:
                inter = Path(scratch) / "f32.gguf"
                facts = convert_hf(folder, inter, "f32", **convert)
                check_per_block(facts, config)
                check_tokenization(inter, folder)
                imatrix = _imatrix_for(source, facts["arch"], imatrix_text) if imatrix_text is not None else None
                llama_cpp_quantize(inter, tmp, qtype, imatrix)
        smoke_check(formats.LLAMA_CPP, tmp, f"GGUF {qtype} export")
    log.info("exported %s (%s) in %.1f s", out, qtype, time.perf_counter() - t0)
    return out
