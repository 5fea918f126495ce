"""The one catalogue of formats: runtimes, their precisions, and the `Artifact` the stages exchange.

Knowledge is data here, in the manner of gguf-py's `constants.py`: one row per
runtime and one row per (runtime, precision), each fact with its reason beside
it. Profiles, the planner, the pipeline, the exporters, verify, the profiler
and the CLI look facts up here; none keeps a table of its own. Adding a
quantization type is one `Precision` row (and its tests).

A runtime has one name everywhere (profiles, command line, reports):
`llama.cpp` and `onnxruntime`. The file-format names `gguf` and `onnx` are
accepted as aliases where a user types a runtime (profiles, `--runtime`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# ---------------------------------------------------------------- verify tolerances

# Tolerance class -> limits for `exporters.verify`. max/mean logit diffs are
# relative to the reference's largest |logit| in the window; ppl_ratio is
# artifact PPL / reference PPL. fp32 must match tightly, 16/8-bit loosely,
# 4/5-bit is judged mainly on top-1 agreement and the perplexity ratio.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_rel_diff": 5e-3, "mean_abs_diff": 1e-2, "top1_min": 0.99, "ppl_ratio_max": 1.001},
    "half": {"max_rel_diff": 5e-2, "mean_abs_diff": 0.1, "top1_min": 0.95, "ppl_ratio_max": 1.01},
    "8bit": {"max_rel_diff": 0.1, "mean_abs_diff": 0.2, "top1_min": 0.90, "ppl_ratio_max": 1.03},
    "4bit": {"max_rel_diff": float("inf"), "mean_abs_diff": float("inf"), "top1_min": 0.70,
             "ppl_ratio_max": 1.30},
}

# ---------------------------------------------------------------- how a precision is made

LLAMA_CONVERTER = "llama.cpp converter"  # written by llama.cpp's convert_hf_to_gguf through its gguf-py (f32/f16/bf16/q8_0)
LLAMA_QUANTIZE = "llama.cpp quantizer"  # llama.cpp's llama_model_quantize from an f32 GGUF (imatrix optional)
GENAI_BUILDER = "onnxruntime-genai builder"  # ONNX Runtime GenAI's model builder (exporters/onnx_genai.py)


# ---------------------------------------------------------------- runtimes


@dataclass(frozen=True)
class Runtime:
    """A runtime FuseDeploy exports to, verifies in and profiles in."""

    name: str  # the one name: profiles, --runtime, reports, backend.name
    file_format: str  # what it reads; artifact names and the accepted alias
    suffix: str  # an artifact is a file with this suffix, or ("") a folder
    marker: str  # the file inside a folder artifact that identifies it ("" for a file artifact)
    weight_files: str  # glob of the files counted as the artifact's size
    backend: str  # "module:Class" of its logits/generation backend (fusedeploy.evaluate)
    exporter: str  # "module:function" called as exporter(model_dir, out, precision)
    kv_bytes: int  # bytes per KV-cache element
    overhead_gb: float  # compute buffers and runtime code beyond weights and KV cache; rough
    embedding_bits: float | None  # bits of the token-embedding table; None: as the weights
    transformers_loads: bool  # stock transformers reads the artifact itself (`eval --runtime auto` uses PyTorch)

    def reads(self, path: Path) -> bool:
        """Does this runtime open `path`? (by name and layout only; the file is not read)"""
        if self.suffix:
            return path.suffix == self.suffix
        return (path / self.marker).is_file() or (path.name == self.marker and path.is_file())

    @property
    def artifact_kind(self) -> str:
        """What an artifact of this runtime is, for messages."""
        return f"{self.suffix} file" if self.suffix else f"folder with {self.marker}"

    def root(self, path: str | os.PathLike) -> Path:
        """The artifact a path points into: the folder for a folder runtime's marker file."""
        p = Path(path)
        return p.parent if self.marker and p.name == self.marker else p

    def size_bytes(self, path: str | os.PathLike) -> int:
        """The artifact's weight bytes: the file, or the weight files of the folder."""
        p = self.root(path)
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob(self.weight_files))

    def backend_class(self) -> type:
        return _load(self.backend)

    def open(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
             logits_all: bool = True):
        """The runtime's backend on this artifact (see fusedeploy.evaluate.runtimes)."""
        return self.backend_class()(self.root(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all)

    def export(self, model_dir: str | os.PathLike, out: str | os.PathLike, precision: str) -> Path:
        """Write `model_dir` as an artifact of `precision` at `out` (+ the runtime's suffix)."""
        spec(self.name, precision)
        target = Path(out)
        if self.suffix and target.suffix != self.suffix:
            target = target.with_name(target.name + self.suffix)
        return Path(_load(self.exporter)(model_dir, target, precision))


LLAMA_CPP = Runtime(
    name="llama.cpp", file_format="gguf", suffix=".gguf", marker="", weight_files="",
    backend="fusedeploy.evaluate.runtimes:LlamaCppBackend", exporter="exporters.gguf:export_gguf",
    kv_bytes=2,  # llama.cpp keeps an f16 KV cache by default
    overhead_gb=0.15,
    embedding_bits=None,  # the quantizer packs the embedding table like the other weights
    transformers_loads=True,  # transformers dequantizes a .gguf file (gguf_file=...)
)
ONNXRUNTIME = Runtime(
    name="onnxruntime", file_format="onnx", suffix="", marker="model.onnx", weight_files="*.onnx*",
    backend="fusedeploy.evaluate.runtimes:OnnxRuntimeBackend", exporter="exporters.onnx:export_onnx",
    kv_bytes=4,  # a CPU model from the GenAI builder keeps its KV cache in fp32 (the graph's io dtype)
    overhead_gb=0.30,
    # The builder's int4 packs a tied embedding with the head: SmolLM2-135M int4 (k_quant_mixed) is 113.6 MB,
    # about 6.8 bits per weight over all of it (BENCHMARKS.md, ONNX int4 by algorithm). An untied table may
    # stay unquantized: not measured.
    embedding_bits=None,
    transformers_loads=False,
)
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (LLAMA_CPP, ONNXRUNTIME)}
# What a user may type for a runtime; the file-format names were the profiles' old spelling.
RUNTIME_ALIASES: dict[str, str] = {r.file_format: r.name for r in RUNTIMES.values()}


# ---------------------------------------------------------------- precisions


@dataclass(frozen=True)
class Precision:
    """One precision of one runtime."""

    runtime: str
    name: str  # as the runtime's tools spell it (llama.cpp's quantize names, ONNX variant names)
    bits: float  # bits per weight of the transformer blocks (planner)
    made_by: str  # LLAMA_CONVERTER, LLAMA_QUANTIZE or GENAI_BUILDER
    tolerance: str  # a TOLERANCES class for verify
    peer: str  # the same precision in the other runtime, for builds that export both
    gguf_file_type: str = ""  # gguf.LlamaFileType member recorded in general.file_type
    devices: tuple[str, ...] = ("cpu", "cuda")  # where an artifact of it runs (ONNX: the execution provider)
    method: str | None = None  # the builder's quantization method (`algo_config`) unless the user picks one

    @property
    def default_device(self) -> str:
        return self.devices[0]

    @property
    def limits(self) -> dict[str, float]:
        return TOLERANCES[self.tolerance]

    def llama_file_type(self) -> int:
        """llama.cpp's file-type number (also llama_model_quantize's ftype), from gguf-py's enum."""
        import gguf

        return int(getattr(gguf.LlamaFileType, self.gguf_file_type))


# GGUF bits per weight: llama.cpp's quantize table (LLaMA-7B file sizes) where it
# gives one; K-quant "_M" mixes keep some tensors at higher types. Block formats
# count their scales: q4_1 stores 20 bytes per 32 weights = 5.0 bits.
# ONNX int4: MatMulNBits 4-bit with one fp32 scale per 32 weights, some tensors 8-bit (its `method`).
_PRECISIONS = (
    Precision("llama.cpp", "f32", 32.0, LLAMA_CONVERTER, "fp32", "fp32", "ALL_F32"),
    Precision("llama.cpp", "f16", 16.0, LLAMA_CONVERTER, "half", "fp32", "MOSTLY_F16"),
    Precision("llama.cpp", "bf16", 16.0, LLAMA_CONVERTER, "half", "fp32", "MOSTLY_BF16"),
    Precision("llama.cpp", "q8_0", 8.5, LLAMA_CONVERTER, "8bit", "int8", "MOSTLY_Q8_0"),
    Precision("llama.cpp", "q6_k", 6.56, LLAMA_QUANTIZE, "8bit", "int8", "MOSTLY_Q6_K"),
    Precision("llama.cpp", "q5_k_m", 5.69, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_Q5_K_M"),
    Precision("llama.cpp", "q5_0", 5.5, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_Q5_0"),  # 22 bytes / 32 weights
    Precision("llama.cpp", "q4_k_m", 4.85, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_Q4_K_M"),
    Precision("llama.cpp", "q4_1", 5.0, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_Q4_1"),  # the built-in's file
    Precision("llama.cpp", "q4_0", 4.55, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_Q4_0"),
    # Non-linear 4-bit grid, 18 bytes / 32 weights; llama.cpp quantizes it without an importance matrix.
    Precision("llama.cpp", "iq4_nl", 4.5, LLAMA_QUANTIZE, "4bit", "int4", "MOSTLY_IQ4_NL"),
    Precision("onnxruntime", "fp32", 32.0, GENAI_BUILDER, "fp32", "f32"),
    # fp16 graphs run on the CPU provider too (checked by the export's smoke run); bf16 has no CPU kernels
    # for every operator the builder writes (Where), so it is a CUDA precision.
    Precision("onnxruntime", "fp16", 16.0, GENAI_BUILDER, "half", "f16"),
    Precision("onnxruntime", "bf16", 16.0, GENAI_BUILDER, "half", "bf16", devices=("cuda",)),
    Precision("onnxruntime", "int8", 8.0, GENAI_BUILDER, "8bit", "q8_0"),  # MatMulNBits 8-bit
    # MatMulNBits, block 32. k_quant_mixed (llama.cpp's q4_k_m choice of int8 tensors, LM head int8) had the
    # least perplexity of the builder's methods: +10.4 % over PyTorch on dense SmolLM2-135M against +27.4 %
    # for the builder's own default, at 113.6 MB against 86.5 MB (6.8 bits per weight over all of it;
    # BENCHMARKS.md, ONNX int4 by algorithm).
    Precision("onnxruntime", "int4", 6.8, GENAI_BUILDER, "4bit", "q4_k_m", method="k_quant_mixed"),
)
PRECISIONS: dict[str, dict[str, Precision]] = {
    r: {p.name: p for p in _PRECISIONS if p.runtime == r} for r in RUNTIMES
}


# ---------------------------------------------------------------- lookups


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def runtime(name: str) -> Runtime:
    """A runtime by its name or alias; a one-line error for anything else."""
    key = RUNTIME_ALIASES.get(name, name)
    try:
        return RUNTIMES[key]
    except KeyError:
        raise UserError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}") from None


def precision_names(runtime_name: str) -> tuple[str, ...]:
    return tuple(PRECISIONS[runtime(runtime_name).name])


def precision_help(runtime_name: str) -> str:
    """The precisions of a runtime as `--help` lists them, each with the devices it runs on when not all."""
    return ", ".join(p.name if p.devices == ("cpu", "cuda") else f"{p.name} ({'/'.join(p.devices)} only)"
                     for p in PRECISIONS[runtime(runtime_name).name].values())


def spec(runtime_name: str, precision: str) -> Precision:
    """The catalogue row of one precision; unknown precisions are an error, never a guess."""
    rt = runtime(runtime_name)
    try:
        return PRECISIONS[rt.name][precision]
    except KeyError:
        raise UserError(f"unknown {rt.name} precision {precision!r}; choose from "
                        f"{', '.join(PRECISIONS[rt.name])}") from None


def peer(runtime_name: str, precision: str, other: str) -> str:
    """`precision` of `runtime_name` expressed in runtime `other` (itself when they are the same)."""
    if runtime(other).name == runtime(runtime_name).name:
        return spec(runtime_name, precision).name
    return spec(other, spec(runtime_name, precision).peer).name


def runtime_opening(path: str | os.PathLike) -> Runtime | None:
    """Which runtime opens this path (None: none does). Answered here and nowhere else."""
    p = Path(path).expanduser()
    return next((rt for rt in RUNTIMES.values() if rt.reads(p)), None)


def runtime_for_path(path: str | os.PathLike) -> Runtime:
    """The runtime that opens this path; a one-line error when none does."""
    found = runtime_opening(path)
    if found is not None:
        return found
    kinds = " or a ".join(r.artifact_kind for r in RUNTIMES.values())
    raise UserError(f"{path} is not an artifact FuseDeploy can run (expected a {kinds})")


def size_bytes(path: str | os.PathLike) -> int:
    """The size of an artifact, counted one way for every stage and command."""
    return runtime_for_path(path).size_bytes(path)


def precision_for_llama_file_type(file_type: int) -> Precision:
    """The GGUF precision whose `general.file_type` is `file_type`; an error when there is none."""
    for p in PRECISIONS[LLAMA_CPP.name].values():
        if p.llama_file_type() == file_type:
            return p
    raise UserError(f"GGUF file type {file_type} is not one FuseDeploy knows "
                    f"({', '.join(PRECISIONS[LLAMA_CPP.name])}); cannot judge it")


# Where each format records the precision it was written at.
def _gguf_precision(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises many types for a bad file
        raise UserError(f"{path} is not a readable GGUF file ({exc})") from None
    recorded = reader.get_field("fusedeploy.export_type")
    if recorded is not None:
        return str(recorded.contents())
    file_type = reader.get_field("general.file_type")
    if file_type is None:
        raise UserError(f"{path} records no general.file_type; cannot tell its precision")
    return precision_for_llama_file_type(int(file_type.contents())).name


def _onnx_precision(path: Path) -> str:
    import onnx

    model_file = path / ONNXRUNTIME.marker
    try:
        meta = {p.key: p.value for p in onnx.load(str(model_file), load_external_data=False).metadata_props}
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{model_file} is not a readable ONNX model ({exc})") from None
    return meta.get("fusedeploy.export_type", "fp32")  # a plain (unquantized) export records nothing


_PRECISION_READERS = {LLAMA_CPP.name: _gguf_precision, ONNXRUNTIME.name: _onnx_precision}


# ---------------------------------------------------------------- the artifact


@dataclass(frozen=True)
class Artifact:
    """An exported model: what the export stage makes and verify, profile and report read."""

    path: Path
    runtime: str
    precision: str
    variant: str = ""  # "compressed" or "dense" in a build
    reference: str = ""  # the PyTorch model it was exported from

    def __post_init__(self):
        rt = runtime(self.runtime)
        object.__setattr__(self, "runtime", rt.name)
        object.__setattr__(self, "path", rt.root(self.path))
        spec(rt.name, self.precision)  # unknown precision: an error now, not a loose verify later

    @classmethod
    def at(cls, path: str | os.PathLike, reference: str = "", variant: str = "") -> Artifact:
        """The artifact at `path`, its runtime from the path and its precision from the file."""
        rt = runtime_for_path(path)
        root = rt.root(Path(path).expanduser())
        if not root.exists():
            raise UserError(f"artifact not found: {path}")
        return cls(root, rt.name, _PRECISION_READERS[rt.name](root), variant, reference)

    @property
    def spec(self) -> Precision:
        return spec(self.runtime, self.precision)

    @property
    def runtime_spec(self) -> Runtime:
        return RUNTIMES[self.runtime]

    @property
    def size_bytes(self) -> int:
        return self.runtime_spec.size_bytes(self.path)

    def open(self, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True):
        return self.runtime_spec.open(self.path, n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all)

    def to_dict(self, root: Path | None = None) -> dict:
        """JSON-ready; `path` relative to `root` when given (a stage folder moves when it finishes)."""
        path = self.path.relative_to(root) if root is not None else self.path
        return {"path": str(path), "runtime": self.runtime, "precision": self.precision, "variant": self.variant,
                "reference": self.reference, "size_bytes": self.size_bytes}

    @classmethod
    def from_dict(cls, data: dict, root: Path | None = None) -> Artifact:
        path = Path(data["path"])
        return cls(root / path if root is not None else path, data["runtime"], data["precision"],
                   data.get("variant", ""), data.get("reference", ""))
