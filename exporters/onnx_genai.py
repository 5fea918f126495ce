"""Hugging Face checkpoint -> ONNX Runtime GenAI folder, through ONNX Runtime GenAI's own model builder.

The builder (`onnxruntime_genai.models.builder`) is maintained with the
runtime: it writes one decoder graph with GroupQueryAttention (RoPE fused, a
KV buffer shared between past and present), int4/int8 weight-only
MatMulNBits when asked (RTN or k_quant, optionally with int8 layers mixed
in), and `genai_config.json`, so `onnxruntime_genai.Model(folder)` loads the
result and `og.Generator` runs the decode loop in C++. It reads the layer
count from `config.json`, so a FuseGPT-compressed checkpoint (blocks
removed, renumbered) builds like any other.

What this module adds is only what the builder does not do for our inputs:

- **Missing special-token ids.** `genai_config.json` needs numeric
  `eos_token_id`/`pad_token_id`; a checkpoint whose config leaves them unset
  gets the tokenizer's.
- **Family facts from the adapter.** A family the builder cannot take is
  refused before building (`refusal`); one it builds under another
  architecture name is dispatched as that (`onnx_builder_architecture`); one
  whose graph matches PyTorch only up to some length gets that context
  (`onnx_context_limit`) in genai_config.json; where the builder's RoPE
  frequencies are not PyTorch's (its YaRN does not truncate the correction
  range, transformers' does), its cos/sin tables get PyTorch's
  (`onnx_rope_inv_freq`).
- Provenance (`fusedeploy.*` in `model.onnx`'s `metadata_props`) and the
  atomic output folder every exporter uses.

The builder reads per-layer attention kinds from the checkpoint's
`layer_types` (which our adapters renumber after block removal), so a
compressed Gemma keeps each block's sliding or full attention.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from fusedeploy import formats
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for

from .common import atomic_path, check_overwrite, provenance, resolve_local, set_metadata_props, smoke_check

log = logging.getLogger(__name__)

# The precisions and the execution providers each runs on are rows of fusedeploy.formats.
# The builder's weight-only quantization methods (`algo_config`), see its --help:
#   default/rtn  round-to-nearest per block;  k_quant  llama.cpp-style k-quant scales;
#   *_last       the LM head in int8;         k_quant_mixed  also llama.cpp's sensitive layers in int8.
INT_ALGOS = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed")
BLOCK_SIZES = (16, 32, 64, 128, 256)
MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"


def _import_builder():
    """The builder module; it expects its own folder on sys.path (the package's __init__ adds it)."""
    try:
        import onnxruntime_genai.models  # noqa: F401 - puts builders/ on sys.path
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise UserError(f"ONNX Runtime GenAI's model builder is not importable ({exc}); "
                        "install the project with `make setup` (onnxruntime-genai)") from None
    return builder


def _fill_token_ids(out: Path, folder: Path) -> None:
    """genai_config.json needs numeric eos/pad ids; where config.json has none, take the tokenizer's.

    (The builder re-reads config.json from disk when it writes genai_config.json, so this patches its output.)
    """
    path = out / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    model = config["model"]
    if model.get("eos_token_id") is not None and model.get("pad_token_id") is not None:
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if model.get("eos_token_id") is None:
        model["eos_token_id"] = tok.eos_token_id
    if model["eos_token_id"] is None:
        raise UserError(f"{folder} declares no end-of-sequence token (config.json or tokenizer); "
                        "set eos_token_id in config.json")
    if model.get("pad_token_id") is None:
        eos = model["eos_token_id"]
        model["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) else eos)
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")


def _limit_context(out: Path, limit: int | None) -> None:
    """Cap genai_config.json's context where the adapter says the graph stops matching PyTorch."""
    if not limit:
        return
    path = out / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["context_length"] = min(int(config["model"]["context_length"]), limit)
    config["search"]["max_length"] = min(int(config["search"]["max_length"]), limit)
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")


def _rope_tables(model, inv_freq, base_dir: Path) -> None:
    """Recompute the builder's `cos_cache`/`sin_cache` [positions, rotary/2] from `inv_freq` (in place).

    The builder's tables are cos/sin(position * inv_freq) times its attention scale, which is
    the value at position 0 of the cos table; only the frequencies are replaced.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    tables = {t.name: t for t in model.graph.initializer if t.name in ("cos_cache", "sin_cache")}
    if set(tables) != {"cos_cache", "sin_cache"}:
        raise UserError("the ONNX graph has no cos_cache/sin_cache to correct the builder's RoPE frequencies in")
    for name, fn in (("cos_cache", torch.cos), ("sin_cache", torch.sin)):
        tensor = tables[name]
        if uses_external_data(tensor):  # becomes an inline tensor; the external bytes are left unused
            load_external_data_for_tensor(tensor, str(base_dir))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
        shape = tuple(tensor.dims)
        if shape[1] != inv_freq.numel():
            raise UserError(f"the builder's {name} has {shape[1]} frequencies, PyTorch's RoPE {inv_freq.numel()}")
        if name == "cos_cache":
            scale = float(numpy_helper.to_array(tensor)[0, 0])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        table = fn(torch.outer(torch.arange(shape[0], dtype=torch.float32), inv_freq.float()))
        new = numpy_helper.from_array(np.asarray(table.numpy() * scale, dtype=dtype), name)
        tensor.CopyFrom(new)


def _stamp(path: Path, meta: dict[str, str], inv_freq=None) -> None:
    """Provenance into metadata_props (and PyTorch's RoPE tables where given); other weights stay external."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    set_metadata_props(model, meta)
    if inv_freq is not None:
        _rope_tables(model, inv_freq, path.parent)
    onnx.save_model(model, str(path))


def check_provider(row, provider: str | None) -> str:
    """The execution provider an export of `row` is built for: one it runs on, and one this host can check."""
    provider = (provider or row.default_device).lower()
    if provider not in row.devices:
        known = {d for p in formats.PRECISIONS[formats.ONNXRUNTIME.name].values() for d in p.devices}
        if provider not in known:
            raise UserError(f"unknown execution provider {provider!r}; choose from {', '.join(sorted(known))}")
        raise UserError(f"ONNX {row.name} runs on {' or '.join(row.devices)}, not {provider}; "
                        f"pass --provider {row.default_device}")
    if provider == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            cpu = [p.name for p in formats.PRECISIONS[formats.ONNXRUNTIME.name].values() if "cpu" in p.devices]
            instead = ("pass --provider cpu" if "cpu" in row.devices
                       else f"choose a precision that runs on the CPU ({', '.join(cpu)})")
            raise UserError(f"an ONNX {row.name} build for CUDA is loaded once before it is written, and this "
                            "onnxruntime-genai has no CUDA provider: install onnxruntime-genai-cuda on a machine "
                            f"with an NVIDIA GPU, or {instead}")
    return provider


def export_onnx_genai(model_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32",
                      provider: str | None = None, algo: str | None = None, block_size: int | None = None,
                      accuracy_level: int | None = None, symmetric: bool = True,
                      force: bool = False) -> Path:
    """Build an ONNX Runtime GenAI folder (`model.onnx`, `genai_config.json`, tokenizer) from a local HF folder.

    `precision`: an onnxruntime row of fusedeploy.formats: fp32, fp16, bf16
    (CUDA only), int8 or int4 (weight-only MatMulNBits; `algo`, `block_size`,
    `accuracy_level` and `symmetric` go to the builder). The folder appears
    only when complete and after one forward pass in ONNX Runtime GenAI.
    """
    row = formats.spec(formats.ONNXRUNTIME.name, (precision or "fp32").lower())
    precision = row.name
    provider = check_provider(row, provider)
    quantized = precision in ("int4", "int8")
    if not quantized and (algo or block_size or accuracy_level):
        raise UserError(f"--algo/--block-size/--accuracy-level apply to int4 and int8, not {precision}")
    if algo is not None and algo not in INT_ALGOS:
        raise UserError(f"unknown quantization method {algo!r}; choose from {', '.join(INT_ALGOS)}")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise UserError(f"block size {block_size} not supported; choose from {', '.join(map(str, BLOCK_SIZES))}")
    if accuracy_level is not None and accuracy_level not in (1, 2, 3, 4):
        raise UserError("--accuracy-level is 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations)")
    out = Path(out_dir)
    check_overwrite(out, force)
    folder = Path(resolve_local(model_dir).location)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        adapter = adapter_for(config)  # our supported families only, one clear error otherwise
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None
    refusal = adapter.refusal(config, "onnx")
    if refusal:
        raise UserError(f"cannot export {adapter.family} ({config.model_type}) to ONNX: {refusal}")

    options = []
    if quantized:
        options += [f"block_size={block_size or 32}", f"is_symmetric={str(symmetric).lower()}"]
        if algo or row.method:
            options.append(f"algo_config={algo or row.method}")
        if accuracy_level:
            options.append(f"accuracy_level={accuracy_level}")
    builder = _import_builder()
    t0 = time.perf_counter()
    chatter = io.StringIO()  # the builder prints progress and per-tensor bars; keep them for --debug, off the terminal
    with atomic_path(out, is_dir=True) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-genai-", dir=out.parent) as cache:
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                parsed = builder.parse_extra_options(None, str(folder), str(tmp), precision, provider, cache, options)
                adapter.adapt_for_genai_builder(parsed["hf_details"]["hf_config"])
                builder.create_model(None, str(folder), str(tmp), precision, provider, cache, **parsed)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt weights and unsupported shapes surface as many types
            log.debug("builder output:\n%s", chatter.getvalue())
            raise UserError(f"ONNX Runtime GenAI's builder could not export {model_dir} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        log.debug("builder output:\n%s", chatter.getvalue())
        _fill_token_ids(tmp, folder)
        _limit_context(tmp, adapter.onnx_context_limit(config))
        meta = {f"fusedeploy.{k}": (",".join(map(str, v)) if isinstance(v, list) else str(v))
                for k, v in provenance(folder, str(model_dir)).items()}
        meta["fusedeploy.export_type"] = precision
        meta["fusedeploy.exporter"] = "onnxruntime-genai builder"
        meta["fusedeploy.execution_provider"] = provider
        if quantized:
            meta[f"fusedeploy.{precision}"] = " ".join(options)
        _stamp(tmp / MODEL_FILE, meta, adapter.onnx_rope_inv_freq(config))
        smoke_check(formats.ONNXRUNTIME, tmp, f"ONNX {precision} export")
    log.info("built %s (%s, %s) in %.1f s", out, precision, provider, time.perf_counter() - t0)
    return out


def genai_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
