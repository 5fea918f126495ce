"""The `fusedeploy` command line. Thin: parse, call the library, print."""

from __future__ import annotations

import errno
import json
import logging
import signal
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import __version__, formats
from .console import console, progress_task
from .errors import BudgetsUnmet, UserError
from .preflight import human_bytes
from .builtin import DEFAULT_CALIB, DEFAULT_METHOD, DEFAULT_MODEL
from .compress.methods import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a decoder-only LM with FuseGPT, export it, verify it, and sign it off for a device.")
_state = {"debug": False}

# Choices shown in --help, read from the format catalogue and the method registry.
PYTORCH = "pytorch"  # `eval` can also run the model itself; not an export target, so not a runtime of formats
EVAL_RUNTIMES = ("auto", PYTORCH, *formats.RUNTIMES)
GGUF_TYPES = ", ".join(formats.precision_names(formats.LLAMA_CPP.name))
METHOD_NAMES = ", ".join(METHODS)


def _version(value: bool) -> None:
    if value:
        print(f"fusedeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Let transformers import Python code shipped with a model (auto_map). "
                                    "Off by default: no code from a model folder or the Hub runs.")] = False,
) -> None:
    from .models.loading import set_trust_remote_code

    set_trust_remote_code(trust_remote_code)
    _quiet_library_progress()
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _quiet_library_progress() -> None:
    """transformers and huggingface_hub draw their own bars on stderr; FuseDeploy reports progress itself."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="HF folder, .gguf file, Hub id, or built-in name.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    help="Hub models: the branch, tag or commit to use (same as --model org/name@revision).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present)")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32, float16, bfloat16 (default: bf16 on GPU, fp32 on CPU)")]
ComputeDtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Compression's compute dtype: float32, bfloat16, or float16 on a GPU (default: bf16 on a GPU "
    "or a CPU with native bf16, else fp32).")]
MaxHostMemoryOpt = Annotated[Optional[float], typer.Option(
    "--max-host-memory", help="GB of host memory compression may use (default: the machine's); a model whose "
    "in-memory run does not fit is streamed from disk block by block (docs/compression.md).")]


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="HF folder, .gguf file, Hub id, or built-in name.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Architecture, block count, sizes and parameter count of a model."""
    from .model_facts import model_info

    model = _with_revision(model, revision)
    facts = model_info(model)
    if as_json:
        print(json.dumps(facts.to_dict(), indent=2))
        return
    table = Table(title=f"{model}", show_header=False)
    for key, value in facts.to_dict().items():
        shown = human_bytes(value) if key.startswith("bytes_") else f"{value:,}" if isinstance(value, int) else value
        table.add_row(key.replace("bytes_", "size at "), str(shown))
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[str, typer.Option("--data", "-d", help=".txt/.jsonl file, folder, builtin, wikitext2, ptb, c4")] = "builtin",
    ctx: Annotated[int, typer.Option(help="Context length of each window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Score at most this many windows.")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in a .jsonl file.")] = "text",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    runtime: Annotated[str, typer.Option(
        help=f"{', '.join(EVAL_RUNTIMES[1:])} (llama.cpp: a .gguf file; onnxruntime: an exported ONNX folder); "
             "auto: onnxruntime for an ONNX folder, else pytorch (a .gguf is then dequantized by transformers)")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Perplexity of a model on a text, over non-overlapping windows."""
    from .data import eval_windows, load_text, tokenize
    from .evaluate import perplexity

    from .preflight import check_readable

    model = _with_revision(model, revision)
    _check_windows(ctx, max_windows)
    check_readable(model)
    check_readable(data)
    text = load_text(data, purpose="eval", text_field=text_field)
    backend, tokenizer = _eval_backend(model, runtime, ctx, device, dtype)
    try:
        windows = eval_windows(tokenize(tokenizer, text), ctx, max_windows)
        with progress_task("perplexity", len(windows)) as update:
            result = perplexity(backend, windows, progress=update)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    payload = {"model": model, "data": data, **result.to_dict()}
    if as_json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"perplexity {result.ppl:.3f}  ({result.windows} windows x {result.ctx} tokens, "
              f"{result.tokens} scored, {result.backend})  model={model} data={data}")


@app.command()
def compress(
    model: ModelOpt = DEFAULT_MODEL,
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="Fraction of blocks to remove, in (0, 1).")] = 0.25,
    method: Annotated[str, typer.Option(help=METHOD_NAMES)] = DEFAULT_METHOD,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text: file, folder, .jsonl, builtin, wikitext2 ..., or self (text the model samples itself, the default).")] = DEFAULT_CALIB,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (a stock Hugging Face checkpoint).")] = "compressed",
    recipe: Annotated[Optional[str], typer.Option(help="paper, cpu or quick (default: paper on a GPU, cpu otherwise)")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="YAML file of setting: value overrides.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override one setting: key=value (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same as --set seed=N).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Distillation epochs (same as --set epochs=N).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last completed iteration.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a finished output / discard a saved state.")] = False,
    device: DeviceOpt = None,
    dtype: ComputeDtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print compression.json to stdout.")] = False,
    keep_steps: Annotated[bool, typer.Option("--keep-steps", help="Also keep what rebuilds the model after every removed block (the quality-vs-sparsity curve).")] = False,
    max_host_memory: MaxHostMemoryOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """Remove blocks with FuseGPT (or a baseline) and write a folded Hugging Face checkpoint."""
    from . import outputs, preflight
    from .compress import CompressJob, compress_model, load_recipe, parse_overrides
    from .compress.hostplan import budget_bytes
    from .console import compression_progress

    model = _with_revision(model, revision)

    for pair in set_ or []:
        key, _, value = pair.partition("=")
        if len(value) > 200:  # Python refuses to parse an integer of thousands of digits
            raise UserError(f"--set {key}=...: a value of {len(value)} characters is too long for a setting; "
                            f"give a plain value such as {key}=3")
    try:
        overrides = parse_overrides(set_)
    except ValueError as exc:
        raise UserError(f"--set: a value could not be read ({str(exc).split(';')[0]}); give a plain value") from None
    if seed is not None:
        overrides["seed"] = seed
    if epochs is not None:
        overrides["epochs"] = epochs
    if config is not None:
        preflight.check_yaml_mapping(config, "config file")
    settings = load_recipe(recipe, overrides, config_file=config)
    budget_bytes(max_host_memory)  # a budget that is no size, before anything is written
    source = preflight.model_location(model)
    preflight.prepare_output(out, force, [source, calib, config], preflight.weights_bytes(source),
                             folder=True)
    with outputs.claim(out), compression_progress() as progress:
        job = CompressJob(model, out, sparsity, method=method, calib=calib, settings=settings, resume=resume,
                          force=force, device=device, dtype=dtype, keep_steps=keep_steps,
                          max_host_memory=max_host_memory)
        report = compress_model(job, progress=progress)
        outputs.mark(out, "compressed-model")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{method}: removed blocks {report['removed_blocks']} (original numbering), "
              f"{report['blocks_before']} -> {report['blocks_after']} blocks in {report['timings']['total_s']:.0f} s; "
              f"wrote {out}")


def _with_revision(model: str, revision: str | None) -> str:
    from .models.loading import with_revision

    return with_revision(model, revision)


def _check_windows(ctx: int, max_windows: int | None) -> None:
    """Window settings checked before a model is loaded."""
    if ctx < 2:
        raise UserError(f"--ctx must be at least 2 (got {ctx})")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1 (got {max_windows})")


def _eval_backend(model: str, runtime: str, ctx: int, device, dtype):
    """(logits backend, tokenizer) for `eval --runtime`; the tokenizer feeds `fusedeploy.data.tokenize`."""
    from pathlib import Path

    from .evaluate import TorchBackend
    from .models.loading import load_model

    path = Path(model).expanduser()
    if runtime == "auto":  # an artifact only its runtime can open runs there; the rest in PyTorch
        opener = formats.runtime_opening(path)
        runtime = opener.name if opener and not opener.transformers_loads else PYTORCH
    if runtime == PYTORCH:
        lm, tokenizer, _ = load_model(model, device=device, dtype=dtype)
        return TorchBackend(lm), tokenizer
    if formats.RUNTIME_ALIASES.get(runtime, runtime) not in formats.RUNTIMES:
        raise UserError(f"unknown --runtime {runtime!r}; choose from {', '.join(EVAL_RUNTIMES)}")
    rt = formats.runtime(runtime)
    if not rt.reads(path):
        raise UserError(f"--runtime {rt.name} needs a {rt.artifact_kind}, not {model}")
    backend = rt.open(path, n_ctx=ctx)
    if not hasattr(backend, "tokenize"):  # the folder carries the Hugging Face tokenizer
        from transformers import AutoTokenizer

        return backend, AutoTokenizer.from_pretrained(rt.root(path))

    class _RuntimeTokenizer:  # the runtime's own tokenizer, called like an HF one by data.tokenize
        def __call__(self, text, **_):
            return {"input_ids": backend.tokenize(text)}

    return backend, _RuntimeTokenizer()


# ---------------------------------------------------------------- export / verify

export_app = typer.Typer(no_args_is_help=True, help="Export a model to GGUF (llama.cpp) or ONNX (ONNX Runtime).")
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("--out", "-o", help="Output .gguf file.")] = ...,
    qtype: Annotated[str, typer.Option("--type", "-t", help=GGUF_TYPES)] = "f16",
    imatrix_data: Annotated[Optional[str], typer.Option(
        help="Calibration text (.txt/.jsonl, folder, builtin, ...) for an importance matrix (llama.cpp-quantized types).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Write a GGUF file for llama.cpp, quantized by llama.cpp's own quantizer where needed."""
    import time

    from exporters.gguf import export_gguf

    from . import outputs, preflight

    types = formats.precision_names(formats.LLAMA_CPP.name)
    if qtype.lower() not in types:  # option values first, before the model is even looked at
        raise UserError(f"unknown GGUF type {qtype!r}; choose from {', '.join(types)}")
    model = _with_revision(model, revision)
    source = preflight.model_location(model)
    preflight.prepare_output(out, force, [source, imatrix_data], 2 * preflight.weights_bytes(source))
    text = preflight.check_text_source(imatrix_data, "calib", "--imatrix-data") if imatrix_data else None
    t0 = time.perf_counter()
    with outputs.claim(out), console.status(f"exporting {model} to GGUF {qtype}"):
        path = export_gguf(model, out, qtype=qtype, imatrix_text=text, force=force)
        outputs.mark(path, "gguf-export")
    print(f"wrote {path} ({human_bytes(formats.size_bytes(path))}, {qtype}, {time.perf_counter() - t0:.1f} s)")


@export_app.command("onnx")
def export_onnx_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = ...,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", "--precision", help=f"{formats.precision_help(formats.ONNXRUNTIME.name)} "
                                          "(default fp32; int8/int4: weight-only MatMulNBits).")] = None,
    engine: Annotated[str, typer.Option(
        help="genai: ONNX Runtime GenAI's builder (og.Model/og.Generator); "
             "optimum: standard ONNX operators only, for runtimes other than ONNX Runtime.")] = "genai",
    provider: Annotated[Optional[str], typer.Option(
        help="cpu or cuda (genai; default: the first device the precision runs on). A cuda build needs "
             "onnxruntime-genai-cuda here: every export is loaded once before it is written.")] = None,
    algo: Annotated[Optional[str], typer.Option(
        help="int4/int8 method (genai): default (the builder's own), rtn, k_quant, rtn_last, k_quant_last, "
             "k_quant_mixed. Unset: int4 uses k_quant_mixed (least perplexity), int8 the builder's default.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="int4/int8 block size (genai): 16..256, default 32.")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option(
        help="int4/int8 MatMul compute (genai): 1 fp32, 2 fp16, 3 bf16, 4 int8 (CPU default).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Write an ONNX model folder for ONNX Runtime (GenAI by default), optionally int8/int4."""
    import time

    from exporters.onnx import export_onnx

    from . import outputs, preflight

    names = formats.precision_names(formats.ONNXRUNTIME.name)
    if quantize is not None and quantize.lower() not in names:
        raise UserError(f"unknown ONNX quantization {quantize!r}; choose from {', '.join(names)}")
    if engine == "optimum":
        from .optional import require_optimum

        require_optimum("--engine optimum")
    else:
        from exporters.onnx_genai import check_provider

        check_provider(formats.spec(formats.ONNXRUNTIME.name, (quantize or "fp32").lower()), provider)
    model = _with_revision(model, revision)
    source = preflight.model_location(model)
    preflight.prepare_output(out, force, [source], 3 * preflight.weights_bytes(source), folder=True)
    genai = {k: v for k, v in dict(provider=provider, algo=algo, block_size=block_size,
                                   accuracy_level=accuracy_level).items() if v is not None}
    t0 = time.perf_counter()
    with outputs.claim(out), console.status(f"exporting {model} to ONNX {quantize or 'fp32'} ({engine})"):
        path = export_onnx(model, out, quantize=quantize, force=force, engine=engine, **genai)
        outputs.mark(path, "onnx-export")
    print(f"wrote {path} ({human_bytes(formats.size_bytes(path))}, {quantize or 'fp32'}, {engine}, "
          f"{time.perf_counter() - t0:.1f} s)")


@app.command()
def verify(
    artifact: Annotated[str, typer.Argument(help="A .gguf file or an exported ONNX folder.")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="The PyTorch model it was exported from.")] = DEFAULT_MODEL,
    data: Annotated[str, typer.Option("--data", "-d", help="Text to score (.txt/.jsonl, folder, builtin, ...).")] = "builtin",
    ctx: Annotated[int, typer.Option(help="Context length of each window.")] = 512,
    max_windows: Annotated[int, typer.Option(help="Compare this many windows.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run an artifact in its real runtime beside the PyTorch reference; exit 1 if outside tolerance."""
    from exporters.verify import verify_artifact

    from .preflight import check_readable

    _check_windows(ctx, max_windows)
    check_readable(artifact)
    with progress_task("verify", max_windows) as update:
        result = verify_artifact(artifact, reference, data, ctx=ctx, max_windows=max_windows, progress=update)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        table = Table(title=f"{artifact} ({result.runtime}, {result.export_type}) vs {reference}", show_header=False)
        for key in ("max_abs_diff", "max_rel_diff", "mean_abs_diff", "top1_agreement", "ppl_artifact",
                    "ppl_reference", "ppl_ratio"):
            table.add_row(key, f"{getattr(result, key):.5g}")
        table.add_row("windows", f"{result.windows} x {result.ctx}")
        console.print(table)
        print("PASS" if result.passed else "FAIL: " + "; ".join(result.failures))
    if not result.passed:
        raise typer.Exit(1)


profiles_app = typer.Typer(no_args_is_help=True, help="Hardware profiles: list, show, plan.")
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("list")
def profiles_list() -> None:
    """The shipped hardware profiles."""
    from .profiling.schema import load_profile, shipped_profiles

    table = Table(title="profiles")
    for col in ("name", "runtime", "memory for model", "bandwidth", "budgets (mem / decode / TTFT)", "description"):
        table.add_column(col)
    for name in shipped_profiles():
        p = load_profile(name)
        b = p.budgets
        table.add_row(name, p.runtime, f"{p.memory_available_gb:g} GB", f"{p.memory_bandwidth_gbps:g} GB/s",
                      f"{b.max_memory_gb:g} GB / {b.min_decode_tokens_per_s:g} tok/s / {b.max_time_to_first_token_s:g} s",
                      p.description)
    console.print(table)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="A shipped profile name or a path to a YAML file.")]) -> None:
    """Every field of one profile, validated."""
    from .profiling.schema import load_profile

    print(json.dumps(load_profile(name).model_dump(), indent=2))


@profiles_app.command("plan")
def profiles_plan(
    profile: Annotated[str, typer.Argument(help="A shipped profile name or a path to a YAML file.")],
    model: ModelOpt = DEFAULT_MODEL,
    sparsity: Annotated[Optional[float], typer.Option(help="Fix the sparsity instead of searching.")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Fix the quantization type instead of searching.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Projected memory and speed of each candidate on a profile, and the one a build would choose."""
    from .models.loading import load_config, resolve_model
    from .profiling.planner import ModelShape, plan
    from .profiling.schema import load_profile

    target = load_profile(profile)
    model = _with_revision(model, revision)
    shape = ModelShape.from_config(load_config(resolve_model(model)))
    result = plan(shape, target, sparsity=sparsity, quant=quant)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"{model} on {target.name} (projected)")
    for col in ("sparsity", "blocks", "quant", "memory GB", "decode tok/s", "TTFT s", "fits"):
        table.add_column(col)
    for c in result.candidates:
        mark = "<- chosen" if c is result.chosen else ("yes" if c.fits else "no")
        table.add_row(f"{c.sparsity:g}", str(c.kept_blocks), c.quant, f"{c.memory_gb:.3f}",
                      f"{c.decode_tokens_per_s:.1f}", f"{c.time_to_first_token_s:.3f}", mark)
    console.print(table)


@app.command()
def build(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A shipped profile name or a path to a YAML file.")],
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("--out", "-o", help="Build folder (one subfolder per stage).")] = "build",
    recipe: Annotated[Optional[str], typer.Option(help="quick (smoke test), cpu or paper (default: paper on a GPU, cpu otherwise)")] = None,
    method: Annotated[str, typer.Option(help="Compression method (see `fusedeploy compress --help`).")] = DEFAULT_METHOD,
    sparsity: Annotated[Optional[float], typer.Option(help="Fix the sparsity instead of letting the planner choose.")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Fix the quantization type instead of letting the planner choose.")] = None,
    calib: Annotated[str, typer.Option(help="Calibration text for compression (default: self, text the model samples itself).")] = DEFAULT_CALIB,
    eval_data: Annotated[str, typer.Option("--eval-data", help="Text for verify perplexity and the quality budget (when it is the --calib source, the build splits it: calibration never reads the evaluation part).")] = "builtin",
    runtime: Annotated[Optional[list[str]], typer.Option(
        help=f"{' and/or '.join(formats.RUNTIMES)} (default: the profile's runtime).")] = None,
    max_ppl_ratio: Annotated[Optional[float], typer.Option("--max-ppl-ratio", help="Quality budget: the compressed artifact's perplexity over the dense one's, at most (overrides the profile's).")] = None,
    max_sparsity: Annotated[Optional[float], typer.Option("--max-sparsity", help="Compress up to this sparsity in one run, measure every point on the way (the quality curve), and deploy the least compression that meets every budget.")] = None,
    eval_tasks: Annotated[Optional[str], typer.Option("--eval-tasks", help="lm-eval task YAML (or a folder of them) reading local data files: accuracy of the dense and the compressed model.")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Budget: the largest task-accuracy drop allowed, as a fraction (0.02 = two points; overrides the profile's).")] = None,
    zero_shot: Annotated[Optional[str], typer.Option("--zero-shot", help="HellaSwag-format JSONL (one {\"query\", \"choices\": [4 endings], \"label\"} per line): lm-eval acc/acc_norm of the dense and the deployed model on a seeded subset, and the retention.")] = None,
    zero_shot_items: Annotated[Optional[int], typer.Option("--zero-shot-items", help="Size of the --zero-shot subset (default: the profile's zero_shot.items, else 1112: standard error at most 1.5 points).")] = None,
    min_zero_shot_retention: Annotated[Optional[float], typer.Option("--min-zero-shot-retention", help="Budget: compressed over dense zero-shot acc_norm, at least (0.95 keeps 95 %; overrides the profile's).")] = None,
    serve_load: Annotated[Optional[bool], typer.Option("--serve-load/--no-serve-load", help="Load-test the deployed artifact behind `fusedeploy serve` in the profile stage (default: when the profile has a `serving` section or budget; --no-serve-load also drops its serving budget).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted build (also what a plain re-run does).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over: discard this build folder's earlier stages (only FuseDeploy's own files).")] = False,
    device: DeviceOpt = None,
    dtype: ComputeDtypeOpt = None,
    max_host_memory: MaxHostMemoryOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """Plan, compress, export, verify, profile and sign off a model for a hardware profile."""
    from .pipeline import BuildOptions
    from .pipeline import build as run_build

    if resume and force:
        raise UserError("--resume continues the build and --force starts it over; pass one of them")
    model = _with_revision(model, revision)
    kw = dict(profile=profile, model=model, out=out, method=method, sparsity=sparsity, quant=quant, calib=calib,
              eval_data=eval_data, runtimes=tuple(runtime or ()), max_ppl_ratio=max_ppl_ratio, force=force,
              device=device, dtype=dtype, max_sparsity=max_sparsity, eval_tasks=eval_tasks,
              max_accuracy_drop=max_accuracy_drop, serve_load=serve_load, zero_shot=zero_shot,
              zero_shot_items=zero_shot_items, min_zero_shot_retention=min_zero_shot_retention,
              max_host_memory=max_host_memory)
    opts = BuildOptions.quick(**kw) if recipe == "quick" else BuildOptions(recipe=recipe, **kw)
    from .console import compression_progress

    with compression_progress() as compress_progress:
        report = run_build(opts, progress=lambda msg: console.print(f"[bold]>[/bold] {msg}"),
                           compress_progress=compress_progress)
    s = report["signoff"]
    for name, c in s["budgets"].items():
        console.print(f"  {name}: {c['figure']:.3f} {c['op']} {c['budget']:g} ({c['basis']})  [{c['result']}]"
                      + (f"  {c['reason']}" if c.get("reason") else ""))
    console.print(f"  verify: [{s['verify']['result']}]")
    curve = report.get("quality_curve")
    if curve:
        console.print(f"  quality curve: {len(curve['points'])} points, deployed {curve['chosen_k']} blocks removed "
                      f"(the least compression meeting every budget)")
    z = report.get("zero_shot")
    if z:
        console.print(f"  zero-shot {z['metric']}: dense {z['dense'][z['metric']]:.4f}, compressed "
                      f"{z['compressed'][z['metric']]:.4f} +/- {z['compressed'][z['metric'] + '_se']:.4f}, retention "
                      f"{z['retention']:.3f} +/- {z['retention_se']:.3f} ({z['subset']['n']} items; scored: "
                      f"{z['compressed']['scored']})", highlight=False)
    for warning in s.get("measurement", {}).get("warnings", []):
        console.print(f"  [yellow]warning:[/yellow] {warning}", highlight=False)
    print(f"sign-off {s['result']}: {s['artifact']} on {report['profile']['name']}; report: {out}/report/report.html")
    if s["result"] != "PASS":
        raise typer.Exit(1)


# ---------------------------------------------------------------- serving

@app.command()
def serve(
    artifact: Annotated[str, typer.Argument(help="A .gguf file or an ONNX Runtime GenAI folder (export onnx).")],
    host: Annotated[str, typer.Option(help="Address to listen on; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
    ctx: Annotated[int, typer.Option(help="Context length per request (GGUF; an ONNX folder uses its own).")] = 2048,
    threads: Annotated[Optional[int], typer.Option(help="Compute threads (default: up to 4).")] = None,
    parallel: Annotated[int, typer.Option(help="Requests generated at once, batched (llama-server slots / og.Engine batch); the rest queue.")] = 4,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="FUSEDEPLOY_API_KEY", help="Require `Authorization: Bearer KEY` on every route but /health (env FUSEDEPLOY_API_KEY).")] = None,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming), /v1/models, /health, /metrics."""
    from .serve import serve as run_server

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535)")
    if parallel < 1:
        raise UserError("--parallel must be at least 1")
    if ctx < 16:
        raise UserError("--ctx must be at least 16 tokens")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the option out")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/yellow] listening on {host} without --api-key: anyone who reaches it "
                      "can use it", highlight=False)
    run_server(artifact, host=host, port=port, n_ctx=ctx, threads=threads, parallel=parallel, api_key=api_key,
               announce=lambda line: print(line, flush=True))


@app.command("bench-serve")
def bench_serve_cmd(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000")],
    concurrency: Annotated[Optional[str], typer.Option(help="Comma-separated client counts, one level each (default 1,4,16 unless --rate is given).")] = None,
    rate: Annotated[Optional[str], typer.Option(help="Comma-separated Poisson request rates (requests/s), one level each.")] = None,
    duration: Annotated[float, typer.Option(help="Seconds per level; each level stops by itself.")] = 30.0,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request (when --output-len is not given).")] = 64,
    prompts: Annotated[Optional[str], typer.Option(help="Prompts: a .jsonl file (one {\"prompt\": ...} per line) or a text file to cut windows from (default: the built-in corpus).")] = None,
    prompt_len: Annotated[str, typer.Option(help="Prompt length in words for text windows: N, uniform:A-B or normal:MEAN,STD.")] = "uniform:32-128",
    output_len: Annotated[Optional[str], typer.Option(help="Output tokens per request: N, uniform:A-B or normal:MEAN,STD.")] = None,
    slo_ttft: Annotated[Optional[float], typer.Option(help="Goodput SLO: time to first token, seconds.")] = None,
    slo_itl: Annotated[Optional[float], typer.Option(help="Goodput SLO: mean inter-token gap, seconds.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="FUSEDEPLOY_API_KEY", help="Bearer key of a server started with --api-key.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts, lengths and arrivals.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Load-test an OpenAI-compatible server: requests/s, output tokens/s, goodput, TTFT and inter-token latency p50/p95/p99."""
    from .serve.bench import bench_serve, float_list, int_list, positive_seconds

    positive_seconds(duration, "--duration")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens})")
    levels = int_list(concurrency, "--concurrency") if concurrency is not None else ([] if rate else [1, 4, 16])
    rates = float_list(rate, "--rate") if rate is not None else []
    result = bench_serve(url, levels, duration, max_tokens=max_tokens, rates=rates, prompts=prompts,
                         prompt_len=prompt_len, output_len=output_len, slo_ttft_s=slo_ttft, slo_itl_s=slo_itl,
                         api_key=api_key, seed=seed,
                         progress=None if as_json else lambda what: console.print(f"{what} for {duration:g} s ..."))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']} at {result['url']} (output {result['output_len']['kind']} "
                        f"<= {result['max_tokens']} tokens)")
    for col in ("load", "req/s", "goodput/s", "out tok/s", "TTFT p50/p95/p99 (s)", "inter-token p50/p95/p99 (ms)",
                "done/errors"):
        table.add_column(col, justify="right")

    def trio(d, scale=1.0, fmt="{:.2f}"):
        return " / ".join("-" if d[k] is None else fmt.format(d[k] * scale) for k in ("p50", "p95", "p99"))

    for lv in result["levels"]:
        load = f"{lv['concurrency']} clients" if lv["mode"] == "concurrency" else f"{lv['rate']:g} req/s"
        table.add_row(load, f"{lv['requests_per_s']:.2f}", f"{lv['goodput_requests_per_s']:.2f}",
                      f"{lv['output_tokens_per_s']:.1f}", trio(lv["ttft_s"]), trio(lv["token_latency_s"], 1000, "{:.1f}"),
                      f"{lv['requests_completed']}/{lv['errors']}")
    console.print(table)


class _Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so `finally` blocks remove temporaries and stop worker processes."""


def _on_sigterm(signum, frame):
    _state["terminated"] = True  # typer turns the interrupt into Exit(130); this tells main it was SIGTERM
    raise _Terminated()


# Environment errors that are the user's to fix (a path), not bugs: one line with the path.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT,
                errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ELOOP}


def _fail(message: str, code: int = 2) -> None:
    from .outputs import secondary_rank

    if secondary_rank():  # under torchrun every rank meets the same mistake: rank 0 says it, the rest exit
        sys.exit(code)
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Without standalone mode, typer returns (not raises) the code of a `typer.Exit`, so no
        # `except typer.Exit` below: it could never fire.
        code = app(standalone_mode=False)
        if _state.get("terminated"):
            console.print("terminated")
            sys.exit(143)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        if _state["debug"]:
            raise
        _fail(escape(str(exc)))
    except BudgetsUnmet as exc:
        print(f"sign-off FAIL: {exc}")
        sys.exit(1)
    except OSError as exc:
        if _state["debug"] or exc.errno not in _PATH_ERRNOS:
            raise
        where = exc.filename if exc.filename is not None else "a path"
        _fail(escape(f"{where}: {exc.strerror or exc}; check the path and its permissions"))
    except typer.Abort:
        console.print("terminated" if _state.get("terminated") else "aborted")
        sys.exit(143 if _state.get("terminated") else 130)
    except KeyboardInterrupt as exc:
        console.print("terminated" if isinstance(exc, _Terminated) else "interrupted")
        sys.exit(143 if isinstance(exc, _Terminated) else 130)
    except typer.TyperException as exc:  # unknown option, bad value: one line, naming the help to read
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see `{ctx.command_path} --help`)"
        _fail(escape(message), getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
