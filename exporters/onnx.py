"""Hugging Face checkpoint -> ONNX: ONNX Runtime GenAI's builder (the default), or Optimum's exporter.

`export_onnx` builds through ONNX Runtime GenAI's model builder
(`exporters/onnx_genai.py`): the folder `og.Model` loads, with fused
attention and a C++ decode loop. The Optimum path below stays for one case
the builder does not cover: a decoder made of **standard ONNX operators
only** (no `com.microsoft` contrib ops such as GroupQueryAttention,
MatMulNBits or SkipSimplifiedLayerNormalization), for ONNX consumers other
than ONNX Runtime; `engine="optimum"` (CLI `--engine optimum`) selects it.
It is also the baseline the benchmarks compare the GenAI path against.

Optimum is an optional dependency (`fusedeploy.optional`): its ONNX exporter
releases lag transformers, so the engine is refused in one line, before any
work, unless a release that supports the installed transformers is present.

Optimum path, all library code: Optimum's exporter writes the decoder
(`text-generation-with-past`: input_ids, attention_mask, position_ids and
past_key_values.* in, logits and present.* out) with its config and
tokenizer files; onnxruntime.quantization makes the int8 (dynamic, per-channel
MatMul weights) and int4 (MatMulNBits, block-wise round-to-nearest)
variants. ONNX Runtime's GPTQ path needs Intel Neural Compressor, which is
not a dependency, so int4 is RTN only. Provenance goes into the model's
`metadata_props` as `fusedeploy.*` entries.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from fusedeploy import formats
from fusedeploy.errors import UserError
from fusedeploy.optional import require_optimum
from fusedeploy.models import adapter_for

from .common import atomic_path, check_overwrite, provenance, resolve_local, set_metadata_props, smoke_check

log = logging.getLogger(__name__)

INT4_BLOCK_SIZE = 32
# What this path makes: Optimum's fp32 export, then ONNX Runtime's int8/int4 quantizers.
OPTIMUM_PRECISIONS = ("fp32", "int8", "int4")
MODEL_FILE = "model.onnx"


def _check_model(folder: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None
    adapter_for(config)
    return config


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save next to its tokenizer/config; weights go external past protobuf's 2 GiB limit."""
    external = model.ByteSize() > 1_800_000_000
    for stale in (path, path.with_name(path.name + "_data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + "_data" if external else None)


def _stamp(path: Path, meta: dict[str, str]) -> None:
    """Write provenance into metadata_props (loading external data so nothing is lost on re-save)."""
    model = onnx.load(str(path), load_external_data=True)
    set_metadata_props(model, meta)
    _save(model, path)


def _quantize(path: Path, mode: str) -> None:
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = path.with_name("model.int8.onnx")
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=False)
        for stale in (path, path.with_name(path.name + "_data")):
            stale.unlink(missing_ok=True)
        tmp.rename(path)
    elif mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        model = onnx.load(str(path), load_external_data=True)
        config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True, bits=4)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        _save(quantizer.model.model, path)


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quantize: str | None = None,
                force: bool = False, engine: str = "genai", **genai_options) -> Path:
    """Export to ONNX: `engine="genai"` (default; `quantize` None/fp32, int8, int4, fp16, bf16, and the
    builder's options, see `export_onnx_genai`) or `engine="optimum"` (standard operators; None, int8, int4)."""
    if engine == "genai":
        from .onnx_genai import export_onnx_genai

        return export_onnx_genai(model_dir, out_dir, precision=quantize or "fp32", force=force, **genai_options)
    if engine != "optimum":
        raise UserError(f"unknown ONNX engine {engine!r}; choose genai or optimum")
    if genai_options:
        raise UserError(f"{', '.join(genai_options)} apply to the genai engine only")
    require_optimum("--engine optimum")
    return export_onnx_optimum(model_dir, out_dir, quantize=quantize, force=force)


def export_onnx_optimum(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quantize: str | None = None,
                        force: bool = False, opset: int | None = None) -> Path:
    """Export a Hugging Face model folder (or built-in name) to an Optimum ONNX folder.

    The folder holds `model.onnx` (decoder with KV cache), config and tokenizer
    files, loadable by `optimum.onnxruntime.ORTModelForCausalLM`. `quantize`: an
    onnxruntime precision of fusedeploy.formats ("fp32" or None: no quantization,
    "int8", "int4"). The folder appears only when complete.
    """
    precision = (quantize or "fp32").lower()
    if precision not in OPTIMUM_PRECISIONS:
        raise UserError(f"--engine optimum writes {', '.join(OPTIMUM_PRECISIONS)}, not {quantize!r}")
    quantize = None if precision == "fp32" else precision  # Optimum's export is fp32; the rest is ORT's quantizer
    out = Path(out_dir)
    check_overwrite(out, force)
    source = resolve_local(model_dir)
    folder = Path(source.location)
    _check_model(folder)
    t0 = time.perf_counter()
    from optimum.exporters.onnx import main_export

    with atomic_path(out, is_dir=True) as tmp:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-onnx-", dir=out.parent) as scratch:
            try:
                main_export(str(folder), output=scratch, task="text-generation-with-past", device="cpu",
                            opset=opset, do_validation=False, local_files_only=True)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - corrupt weights surface as many types
                raise UserError(f"Optimum could not export {model_dir} to ONNX ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            for item in Path(scratch).iterdir():
                shutil.move(str(item), tmp / item.name)
        path = tmp / MODEL_FILE
        if quantize:
            _quantize(path, quantize)
        meta = {f"fusedeploy.{k}": (",".join(map(str, v)) if isinstance(v, list) else str(v))
                for k, v in provenance(folder, str(model_dir)).items()}
        meta["fusedeploy.export_type"] = quantize or "fp32"
        meta["fusedeploy.exporter"] = "optimum"
        if quantize == "int4":
            meta["fusedeploy.int4"] = f"MatMulNBits RTN symmetric block {INT4_BLOCK_SIZE}"
        _stamp(path, meta)
        smoke_check(formats.ONNXRUNTIME, tmp, f"ONNX {quantize or 'fp32'} export (optimum)")
    log.info("exported %s (%s) in %.1f s", out, quantize or "fp32", time.perf_counter() - t0)
    return out
