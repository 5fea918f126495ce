"""The `fusedeploy` command line. Thin: parse, call the library, print."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import __version__
from .console import console, progress_task
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a decoder-only LM with FuseGPT, export it, verify it, and sign it off for a device.")
_state = {"debug": False}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _version(value: bool) -> None:
    if value:
        print(f"fusedeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="HF folder, .gguf file, Hub id, or built-in name.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present)")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32, float16, bfloat16 (default: bf16 on GPU, fp32 on CPU)")]


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="HF folder, .gguf file, Hub id, or built-in name.")] = "smollm2-135m",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Architecture, block count, sizes and parameter count of a model."""
    from .inspect import model_info

    facts = model_info(model)
    if as_json:
        print(json.dumps(facts.to_dict(), indent=2))
        return
    table = Table(title=f"{model}", show_header=False)
    for key, value in facts.to_dict().items():
        shown = _human_bytes(value) if key.startswith("bytes_") else f"{value:,}" if isinstance(value, int) else value
        table.add_row(key.replace("bytes_", "size at "), str(shown))
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "smollm2-135m",
    data: Annotated[str, typer.Option("--data", "-d", help=".txt/.jsonl file, folder, builtin, wikitext2, ptb, c4")] = "builtin",
    ctx: Annotated[int, typer.Option(help="Context length of each window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Score at most this many windows.")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in a .jsonl file.")] = "text",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Perplexity of a model on a text, over non-overlapping windows."""
    from .data import eval_windows, load_text, tokenize
    from .evaluate import TorchBackend, perplexity
    from .models.loading import load_model

    text = load_text(data, purpose="eval", text_field=text_field)
    lm, tokenizer, _ = load_model(model, device=device, dtype=dtype)
    windows = eval_windows(tokenize(tokenizer, text), ctx, max_windows)
    with progress_task("perplexity", len(windows)) as update:
        result = perplexity(TorchBackend(lm), windows, progress=update)
    payload = {"model": model, "data": data, **result.to_dict()}
    if as_json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"perplexity {result.ppl:.3f}  ({result.windows} windows x {result.ctx} tokens, "
              f"{result.tokens} scored, {result.backend})  model={model} data={data}")


@app.command()
def compress(
    model: ModelOpt = "smollm2-135m",
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="Fraction of blocks to remove, in (0, 1).")] = 0.25,
    method: Annotated[str, typer.Option(help="fusegpt, fusegpt-oneshot, sleb, shortgpt, mi, mi-lora, static-fusion")] = "fusegpt",
    calib: Annotated[str, typer.Option("--calib", help="Calibration text: file, folder, .jsonl, builtin, wikitext2 ...")] = "builtin",
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (a stock Hugging Face checkpoint).")] = "compressed",
    recipe: Annotated[Optional[str], typer.Option(help="paper, cpu or quick (default: paper on a GPU, cpu otherwise)")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="YAML file of setting: value overrides.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override one setting: key=value (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same as --set seed=N).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Distillation epochs (same as --set epochs=N).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last completed iteration.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a finished output / discard a saved state.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print compression.json to stdout.")] = False,
) -> None:
    """Remove blocks with FuseGPT (or a baseline) and write a folded Hugging Face checkpoint."""
    from .compress import compress_model, load_recipe, parse_overrides
    from .console import make_progress

    overrides = parse_overrides(set_)
    if seed is not None:
        overrides["seed"] = seed
    if epochs is not None:
        overrides["epochs"] = epochs
    settings = load_recipe(recipe, overrides, config_file=config)
    with make_progress() as bar:
        tasks: dict[str, int] = {}

        def progress(kind: str, done: int, total: int, status: str = "") -> None:
            label = {"iteration": "blocks removed", "score": "scoring candidates",
                     "epoch": "distillation epoch"}.get(kind, kind)
            if kind not in tasks:
                tasks[kind] = bar.add_task(label, total=total, status="")
            bar.update(tasks[kind], completed=done, total=total, status=status)

        report = compress_model(model, out, sparsity, method=method, calib=calib, settings=settings,
                                resume=resume, device=device, dtype=dtype, progress=progress, force=force)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{method}: removed blocks {report['removed_blocks']} (original numbering), "
              f"{report['blocks_before']} -> {report['blocks_after']} blocks in {report['timings']['total_s']:.0f} s; "
              f"wrote {out}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own message and exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
