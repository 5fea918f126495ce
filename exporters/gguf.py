"""Hugging Face checkpoint -> GGUF file for llama.cpp.

gguf-py supplies the file writer, the architecture constants, the HF->GGUF
tensor-name maps, the merges/special-token reader and the f16/bf16/q8_0
packers; llama.cpp (through llama-cpp-python) supplies the quantizer for
every other type. What neither ships is the small loop that walks an HF
state dict and applies each family's layout facts (q/k row permutation for
llama.cpp's RoPE, Gemma's norm offset, tied output) -- gguf-py has no
converter script and llama.cpp's convert_hf_to_gguf.py is not a library --
so that loop is written here, with the per-family facts kept on the
adapters in `fusedeploy/models/families.py`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fusedeploy import formats
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for

from .common import atomic_path, check_overwrite, provenance, resolve_local

log = logging.getLogger(__name__)

# llama.cpp names for BPE pre-tokenizers, tried in this order until one
# tokenizes the probe text exactly as the Hugging Face tokenizer does.
PRE_TOKENIZER_CANDIDATES = ("smollm", "gpt-2", "llama-bpe", "qwen2", "gpt-4o", "starcoder", "falcon",
                            "deepseek-llm", "stablelm2", "olmo", "command-r", "default")

_PROBE = ("Hello world! It's 2024-05-17, and 12.5 million people's lives cost $3,141.59.\n\n"
          "  Indented   spaces\tand\ttabs; naïve café — “quotes” ... 東京 😀 don't WON'T we'll\n"
          "def f(x):\n    return x**2 + 1_000_000  # comment\n")


def _arch_enum(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise UserError(f"this gguf-py has no architecture {name!r}; upgrade the gguf package")


def _load_hf(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input folder
        raise UserError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None
    adapter = adapter_for(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt weights raise many types
        raise UserError(f"cannot read the weights in {folder} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'}); is the file complete?") from None
    return model.eval(), config, adapter


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair order, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def gguf_tensors(model, config, adapter):
    """Yield (gguf_name, float32 array) for every tensor llama.cpp reads."""
    import gguf

    n_blocks = len(adapter.blocks(model))
    tmap = gguf.get_tensor_name_map(_arch_enum(adapter.gguf_arch), n_blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    if adapter.gguf_requires_tied_output and not tied:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise UserError(f"llama.cpp's {adapter.gguf_arch} graph ties the output layer to the embeddings, "
                            "but this model has a separate lm_head")
        tied = True
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UserError(f"no GGUF name for tensor {name!r} of {adapter.family}; unsupported layout")
        data = tensor.detach().float().cpu().numpy()
        if adapter.gguf_permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_qk(data, config.num_attention_heads)
        elif adapter.gguf_permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_qk(data, config.num_key_value_heads)
        if adapter.gguf_norm_offset and name.endswith("norm.weight"):
            data = data + adapter.gguf_norm_offset
        yield gname, np.ascontiguousarray(data, dtype=np.float32)


def _add_hparams(writer, config, adapter, n_blocks: int) -> None:
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_vocab_size(int(config.vocab_size))
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        import gguf

        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind != "default":
            raise UserError(f"RoPE scaling {kind!r} is not supported by this exporter yet")
    arch = adapter.gguf_arch
    for key, value in adapter.gguf_extra_metadata(config).items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_array(full, list(value))


# ---------------------------------------------------------------- tokenizer


def _copy_tokenizer_from_gguf(writer, origin: Path, vocab_size: int) -> None:
    """Carry `tokenizer.*` over verbatim from the GGUF the model was converted from."""
    import gguf

    reader = gguf.GGUFReader(origin)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise UserError(f"{origin} has no tokenizer for a {vocab_size}-token vocabulary")
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub_type=sub)


def _bpe_tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types from tokenizer.json, ids in order.

    gguf-py's `BpeVocab` reads the same file but refuses tokenizer.json files
    with `byte_fallback` set (transformers writes those when it rebuilds a
    tokenizer from a GGUF file, as for the built-in SmolLM2), so the
    vocabulary list is read directly here; merges and special ids still come
    from gguf-py's `SpecialVocab`.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; the GGUF exporter needs a fast (tokenizers) tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    pre = json.dumps(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise UserError("only byte-level BPE tokenizers (GPT-2 style) are exported to GGUF so far; "
                        f"{folder} has a {model.get('type')} tokenizer")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tj.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _write_bpe_tokenizer(writer, folder: Path, vocab_size: int, pre: str) -> None:
    import gguf

    tokens, types = _bpe_tokens(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _hf_ids(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(text, add_special_tokens=False)["input_ids"]


def _llama_cpp_ids(gguf_path: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def probe_text() -> str:
    from fusedeploy.data import load_text

    return _PROBE + load_text("builtin")[:20000]


def detect_pre_tokenizer(folder: Path, config, adapter) -> str:
    """The llama.cpp pre-tokenizer name that reproduces the HF tokenizer on a probe text.

    llama.cpp's converter picks it from a hash table of known tokenizers;
    here each candidate is written into a vocab-only GGUF and tokenizes the
    probe in llama.cpp itself, which also proves the result.
    """
    import gguf

    text = probe_text()
    want = _hf_ids(folder, text)
    with tempfile.TemporaryDirectory(prefix="fusedeploy-pre-") as tmp:
        for pre in PRE_TOKENIZER_CANDIDATES:
            path = Path(tmp) / f"{pre}.gguf"
            writer = gguf.GGUFWriter(path, adapter.gguf_arch)
            _add_hparams(writer, config, adapter, int(config.num_hidden_layers))
            _write_bpe_tokenizer(writer, folder, int(config.vocab_size), pre)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            try:
                got = _llama_cpp_ids(path, text)
            except Exception as exc:  # noqa: BLE001 - a candidate llama.cpp rejects is just skipped
                log.debug("pre-tokenizer %s rejected by llama.cpp: %s", pre, exc)
                continue
            if got == want:
                log.info("pre-tokenizer %s matches the Hugging Face tokenizer", pre)
                return pre
    raise UserError(f"no llama.cpp pre-tokenizer reproduces the tokenizer in {folder}; "
                    f"tried {', '.join(PRE_TOKENIZER_CANDIDATES)}")


# ---------------------------------------------------------------- writing


def _write_direct(path: Path, model, config, adapter, qtype: str, meta: dict, source, folder: Path,
                  pre: str | None) -> None:
    import gguf

    n_blocks = len(adapter.blocks(model))
    if int(config.num_hidden_layers) != n_blocks:
        raise UserError(f"config says {config.num_hidden_layers} blocks but the model has {n_blocks}")
    writer = gguf.GGUFWriter(path, adapter.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(meta["name"])
    writer.add_file_type(formats.spec(formats.LLAMA_CPP.name, qtype).llama_file_type())
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("general.source.url", meta["source_model"])
    for key, value in meta["provenance"].items():
        if isinstance(value, list):
            writer.add_array(f"fusedeploy.{key}", value)
        else:
            writer.add_string(f"fusedeploy.{key}", str(value))
    writer.add_string("fusedeploy.export_type", meta["export_type"])
    _add_hparams(writer, config, adapter, n_blocks)
    if source.origin_gguf:
        _copy_tokenizer_from_gguf(writer, Path(source.origin_gguf), int(config.vocab_size))
    else:
        _write_bpe_tokenizer(writer, folder, int(config.vocab_size), pre)

    for gname, data in gguf_tensors(model, config, adapter):
        if data.ndim < 2 or qtype == "f32":
            writer.add_tensor(gname, data)
        elif qtype == "f16":
            writer.add_tensor(gname, data.astype(np.float16))
        elif qtype == "bf16":
            writer.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
            writer.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # q8_0 needs rows in blocks of 32; keep the odd tensor in f16
            writer.add_tensor(gname, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def compute_imatrix(model, config, adapter, text: str, tokenizer, ctx: int = 512,
                    max_windows: int = 16) -> dict[str, np.ndarray]:
    """Per-input-column mean of squared activations for every linear layer, keyed by GGUF name.

    This is what llama.cpp's `llama-imatrix` tool collects; llama-cpp-python
    ships the quantizer's imatrix input (`llama_model_imatrix_data`) but not
    the collecting tool, so the statistics are gathered with PyTorch hooks.
    """
    import gguf

    from fusedeploy.data import eval_windows, tokenize

    windows = eval_windows(tokenize(tokenizer, text), ctx, max_windows)
    tmap = gguf.get_tensor_name_map(_arch_enum(adapter.gguf_arch), len(adapter.blocks(model)))
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


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, qtype: str = "f16",
                imatrix_text: str | None = None, force: bool = False) -> Path:
    """Export a Hugging Face model folder (or built-in name) to a GGUF file of type `qtype`.

    f32/f16/bf16/q8_0 are written directly by gguf-py; q4_0/q4_k_m/q5_k_m/q6_k
    are quantized by llama.cpp from an f32 intermediate, weighted by an
    importance matrix when `imatrix_text` (calibration text) is given.
    Returns the output path; the file appears only when complete.
    """
    qtype = qtype.lower()
    types = formats.precision_names(formats.LLAMA_CPP.name)
    if qtype not in types:
        raise UserError(f"unknown GGUF type {qtype!r}; choose from {', '.join(types)}")
    direct = formats.spec(formats.LLAMA_CPP.name, qtype).made_by == formats.GGUF_PY
    if imatrix_text is not None and direct:
        raise UserError(f"an importance matrix only applies to llama.cpp-quantized types, not {qtype}")
    out = Path(out_file)
    check_overwrite(out, force)
    source = resolve_local(model_dir)
    folder = Path(source.location)
    t0 = time.perf_counter()
    model, config, adapter = _load_hf(folder)
    pre = None if source.origin_gguf else detect_pre_tokenizer(folder, config, adapter)
    meta = {"name": re.sub(r"[^\w.-]+", "-", folder.name), "source_model": str(model_dir),
            "provenance": provenance(folder, str(model_dir)), "export_type": qtype}
    with atomic_path(out) as tmp:
        if direct:
            _write_direct(tmp, model, config, adapter, qtype, meta, source, folder, pre)
        else:
            imatrix = None
            if imatrix_text is not None:
                from fusedeploy.models.loading import load_tokenizer

                imatrix = compute_imatrix(model, config, adapter, imatrix_text, load_tokenizer(source))
                meta["provenance"]["imatrix"] = "pytorch-hooks"
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-f32-", dir=out.parent) as scratch:
                inter = Path(scratch) / "f32.gguf"
                _write_direct(inter, model, config, adapter, "f32", {**meta, "export_type": qtype}, source,
                              folder, pre)
                del model
                llama_cpp_quantize(inter, tmp, qtype, imatrix)
    log.info("exported %s (%s) in %.1f s", out, qtype, time.perf_counter() - t0)
    return out
