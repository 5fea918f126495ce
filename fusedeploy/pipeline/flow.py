"""`fusedeploy build`: plan -> compress -> (curve) -> export -> verify -> (tasks) -> (zeroshot) -> profile -> report.

`build` checks every input before anything is written (`_preflight`), then runs the stages of
`stages/` in order into one build folder, wiring each stage's config from the options and its
inputs from the model, the text files and the earlier stages' results. Re-running with the same
inputs and settings skips finished stages; an interrupted one resumes (stages/__init__.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import formats, outputs, preflight
from ..builtin import DEFAULT_CALIB, DEFAULT_METHOD, DEFAULT_MODEL
from ..errors import UserError
from . import stages
from .stages import compress as compress_stage
from .stages import curve as curve_stage
from .stages import export as export_stage
from .stages import plan as plan_stage
from .stages import profile as profile_stage
from .stages import report as report_stage
from .stages import tasks as tasks_stage
from .stages import verify as verify_stage
from .stages import zeroshot as zeroshot_stage

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    profile: str
    model: str = DEFAULT_MODEL
    out: str = "build"
    recipe: str | None = None  # compression recipe: quick, cpu, paper
    method: str = DEFAULT_METHOD
    sparsity: float | None = None
    quant: str | None = None
    calib: str = DEFAULT_CALIB
    eval_data: str = "builtin"
    max_ppl_ratio: float | None = None  # overrides the profile's budgets.max_perplexity_ratio
    max_sparsity: float | None = None  # the quality curve: compress up to here, deploy the least that meets all
    eval_tasks: str | None = None  # lm-eval task YAML (or a folder of them) with local data
    max_accuracy_drop: float | None = None  # overrides the profile's budgets.max_accuracy_drop
    zero_shot: str | None = None  # HellaSwag-format JSONL (query, four choices, label): zero-shot retention
    zero_shot_items: int | None = None  # the subset's size; overrides the profile's zero_shot.items
    min_zero_shot_retention: float | None = None  # overrides the profile's budgets.min_zero_shot_retention
    device: str | None = None  # compression device (default: cuda when present)
    dtype: str | None = None  # compression compute dtype (default: compress.runner.default_compute_dtype)
    max_host_memory: float | None = None  # GB compression may use on the host (None: the machine's)
    runtimes: tuple[str, ...] = ()  # default: the profile's runtime
    verify_windows: int = 4
    verify_ctx: int = 512
    profile_runs: int = 3
    prompt_tokens: int | None = None  # default: the profile's
    new_tokens: int = 32
    serve_load: bool | None = None  # serving load test: None = as the profile says (a serving section or budget)
    force: bool = False  # start over: empty the build folder (ours only) first

    @classmethod
    def quick(cls, **kw) -> BuildOptions:
        """The smoke recipe: small everything, for tests and a first look."""
        base = dict(recipe="quick", verify_windows=1, verify_ctx=128, profile_runs=3, prompt_tokens=32,
                    new_tokens=8)
        return cls(**{**base, **kw})


def _with_quality_budgets(profile, max_ppl_ratio: float | None, max_accuracy_drop: float | None,
                          min_zero_shot_retention: float | None = None):
    """The profile with `--max-ppl-ratio` / `--max-accuracy-drop` / `--min-zero-shot-retention` in place of its own."""
    update = {}
    if max_ppl_ratio is not None:
        if not max_ppl_ratio >= 1:  # also refuses NaN
            raise UserError(f"--max-ppl-ratio must be at least 1 (the dense model's own perplexity), got {max_ppl_ratio}")
        update["max_perplexity_ratio"] = float(max_ppl_ratio)
    if max_accuracy_drop is not None:
        if not 0 <= max_accuracy_drop <= 1:
            raise UserError(f"--max-accuracy-drop is a fraction of accuracy in [0, 1] (0.02 = two points), "
                            f"got {max_accuracy_drop}")
        update["max_accuracy_drop"] = float(max_accuracy_drop)
    if min_zero_shot_retention is not None:
        if not 0 < min_zero_shot_retention <= 1:  # also refuses NaN
            raise UserError(f"--min-zero-shot-retention is compressed over dense accuracy, in (0, 1] (0.95 keeps "
                            f"95 %), got {min_zero_shot_retention}")
        update["min_zero_shot_retention"] = float(min_zero_shot_retention)
    if not update:
        return profile
    return profile.model_copy(update={"budgets": profile.budgets.model_copy(update=update)})


def check_curve(blocks: int, opts: BuildOptions) -> None:
    """`--max-sparsity` alone, in (0, 1), and keeping at least one block."""
    from ..profiling.planner import removed_for

    if opts.max_sparsity is None:
        return
    if opts.sparsity is not None:
        raise UserError("--sparsity fixes one point and --max-sparsity measures a curve to choose from; pass one")
    if not 0 < opts.max_sparsity < 1:  # also refuses NaN
        raise UserError(f"--max-sparsity must be in (0, 1), got {opts.max_sparsity}")
    if removed_for(blocks, opts.max_sparsity) >= blocks:
        raise UserError(f"--max-sparsity {opts.max_sparsity:g} would remove all {blocks} blocks; give at most "
                        f"{(blocks - 1) / blocks:.2f}")


STAGES = {m.NAME: m.WRITES for m in (plan_stage, compress_stage, curve_stage, export_stage, verify_stage, tasks_stage,
                                 zeroshot_stage, profile_stage, report_stage)}  # each stage's name: the names it writes


@dataclass(frozen=True)
class Prepared:
    """What the preflight found: everything the stages are wired from, besides the options."""

    profile: object  # schema.Profile, with the options' quality budgets and serving choice
    source: object  # models.loading.ModelSource
    model_dir: Path
    shape: object  # planner.ModelShape
    runtimes: tuple[str, ...]
    model_input: Path  # what the stages key on for the model: its folder, or its GGUF file
    levels: tuple[float, ...] | None  # the quality curve's sparsities, or None
    zero_shot: object = None  # evaluate.zero_shot.Subset the zeroshot stage scores, or None


def _preflight(opts: BuildOptions) -> Prepared:
    """Every check that can fail on the user's input, before anything is written or computed.

    Options, profile, model, plan (a budget nothing can meet), tasks, zero-shot data, texts readable (they parse,
    the tokenizer loads), the build folder writable with room. Add new checks here.
    """
    from ..compress.calibration import SELF
    from ..data import HF_DATASETS
    from ..models.loading import load_config, load_tokenizer, resolve_model
    from ..profiling.planner import ModelShape, plan
    from ..profiling.schema import load_profile

    out = Path(opts.out)
    preflight.check_path_length(out)
    if opts.recipe is not None:
        from ..compress import RECIPES

        if opts.recipe not in RECIPES:
            raise UserError(f"unknown --recipe {opts.recipe!r}; choose from {', '.join(RECIPES)}")
    profile = _with_quality_budgets(load_profile(opts.profile), opts.max_ppl_ratio, opts.max_accuracy_drop,
                                    opts.min_zero_shot_retention).with_serving(opts.serve_load)
    if opts.device or opts.dtype:  # an unusable device or dtype fails before anything is written
        from ..compress.runner import check_compute_dtype
        from ..models.loading import pick_device, pick_dtype

        device = pick_device(opts.device)
        check_compute_dtype(device, pick_dtype(device, opts.dtype))
    if opts.max_host_memory is not None:  # a budget that is no size fails here; one too small, at compression
        from ..compress.hostplan import budget_bytes

        budget_bytes(opts.max_host_memory)
    source = resolve_model(opts.model)
    model_dir = Path(source.location)
    shape = ModelShape.from_config(load_config(source))
    runtimes = tuple(dict.fromkeys(formats.runtime(r).name for r in opts.runtimes)) or (profile.runtime,)
    check_curve(shape.blocks, opts)
    levels = plan_stage.curve_levels(shape.blocks, opts.max_sparsity)
    plan(shape, profile, sparsity=levels[-1] if levels else opts.sparsity, quant=opts.quant)
    from ..evaluate.tasks import check_tasks

    check_tasks(opts.eval_tasks, profile.budgets.max_accuracy_drop, opts.max_accuracy_drop is not None)
    from ..evaluate.zero_shot import check_zero_shot
    from ..profiling.schema import ZeroShot

    subset_settings = profile.zero_shot or ZeroShot()
    zero_shot = check_zero_shot(opts.zero_shot, opts.zero_shot_items, subset_settings.seed, subset_settings.items,
                                profile.budgets.min_zero_shot_retention, opts.min_zero_shot_retention is not None)
    for path in (opts.model, opts.calib, opts.eval_data, model_dir, opts.eval_tasks, opts.zero_shot):
        preflight.check_readable(path)
    for spec, purpose in ((opts.calib, "calib"), (opts.eval_data, "eval")):
        if spec not in HF_DATASETS and spec != SELF:  # a dataset name would need the network; self is generated
            preflight.check_text_source(spec, purpose, "--calib" if purpose == "calib" else "--eval-data")
    tokenizer = load_tokenizer(source)
    if opts.calib not in HF_DATASETS and opts.calib != SELF:
        from ..compress import load_recipe
        from ..compress.driver import calibration_tokens
        from ..data.split import BuildTexts

        calibration_tokens(tokenizer, opts.calib, BuildTexts(opts.calib, opts.eval_data).calib,
                           load_recipe(opts.recipe).seq_len)
    outputs.check_separate(opts.out, [opts.model, model_dir, opts.calib, opts.eval_data, opts.eval_tasks,
                                      opts.zero_shot])
    preflight.check_writable(opts.out, preflight.weights_bytes(model_dir) * (1 + 2 * len(runtimes)), folder=True)
    model_input = model_dir / source.gguf_file if source.gguf_file else model_dir
    return Prepared(profile, source, model_dir, shape, runtimes, model_input, levels, zero_shot)


def _text_inputs(**specs: str) -> dict[str, Path]:
    """The text sources that are local files or folders, so their content is part of a stage's key."""
    return {name: Path(spec) for name, spec in specs.items() if Path(spec).exists()}


def build(opts: BuildOptions, progress=None, compress_progress=None) -> dict:
    """Run every stage into `opts.out`; returns the report (with its sign-off).

    `progress(message)` announces each step; `compress_progress` is handed to
    `compress_model` for its per-iteration and per-epoch bars.
    """
    say = progress or (lambda msg: log.info(msg))
    ready = _preflight(opts)
    out = Path(opts.out)
    with outputs.claim(out), stages.announcing(say, compress_progress, opts.max_host_memory):
        outputs.claim_build_folder(out, STAGES, force=opts.force)
        return _run(opts, out, ready)


def _run(opts: BuildOptions, out: Path, ready: Prepared) -> dict:
    """The stages, in order, inside a claimed build folder: each one's config and inputs, nothing else."""
    from ..data.split import BuildTexts

    profile, shape, levels = ready.profile, ready.shape, ready.levels
    model = {"model": ready.model_input}
    split = BuildTexts(opts.calib, opts.eval_data)  # one source for both: calibration and evaluation halves
    ran: dict[str, dict] = {}  # each stage's manifest as this build found or made it

    def stage(module, config, inputs) -> dict:
        ran[module.NAME] = stages.run_declared(out, module, config, inputs)
        return ran[module.NAME]

    stages.say("plan")
    planned = stage(plan_stage, plan_stage.Config(profile.model_dump(), opts.sparsity, opts.max_sparsity, opts.quant,
                                                  shape.__dict__), model)
    chosen = dict(planned["outputs"]["chosen"])
    deepest = round(levels[-1] * shape.blocks) if levels else chosen["removed_blocks"]

    stages.say(f"compress: {deepest} of {shape.blocks} blocks, {opts.method}"
               + (" (keeping every step for the quality curve)" if levels else ""))
    compressed = stage(compress_stage, compress_stage.Config(
        deepest / shape.blocks, opts.method, opts.recipe, opts.calib, split.calib, opts.device, opts.dtype,
        levels is not None), {**model, **_text_inputs(calib=opts.calib)})
    eval_text = dict(spec=opts.eval_data, part=split.eval, ctx=opts.verify_ctx, windows=opts.verify_windows)
    prompt = opts.prompt_tokens or profile.prompt_tokens

    if levels:  # deepest >= 1: the compress stage ran; choose on measured quality
        curve = stage(curve_stage, curve_stage.Config(chosen["quant"], eval_text, prompt, opts.new_tokens,
                                                      opts.profile_runs, profile.runtime),
                      {"compress": compressed, **model, **_text_inputs(eval_data=opts.eval_data)})
        chosen = _choose_on_curve(curve, profile, shape)
    k = chosen["removed_blocks"] if compressed["outputs"]["compressed"] else 0

    targets = []
    for runtime in ready.runtimes:
        precision = formats.peer(profile.runtime, chosen["quant"], runtime)
        for variant in (("compressed", "dense") if k else ("compressed",)):
            targets.append((f"{variant}-{formats.runtime(runtime).file_format}-{precision}", variant, runtime,
                            precision))
    exported = stage(export_stage, export_stage.Config(tuple(targets), k), {"compressed": compressed, **model})

    stage(verify_stage, verify_stage.Config(opts.eval_data, split.eval, opts.verify_ctx, opts.verify_windows),
          {"export": exported, **_text_inputs(eval_data=opts.eval_data)})
    if opts.eval_tasks is not None:
        stage(tasks_stage, tasks_stage.Config(k), {"export": exported, "tasks": Path(opts.eval_tasks), **model})
    if ready.zero_shot is not None:
        z = ready.zero_shot
        stage(zeroshot_stage, zeroshot_stage.Config(z.items, z.seed, profile.runtime),
              {"export": exported, "zero_shot": Path(z.path)})
    stage(profile_stage, profile_stage.Config(prompt, opts.new_tokens, opts.profile_runs, profile.model_dump(),
                                              shape.__dict__,
                                              {r: formats.runtime(r).kv_bytes for r in ready.runtimes}),
          {"export": exported, "plan": planned})

    # Every earlier stage's folder is keyed, one left by an earlier build with other options too
    # (as a path: not reported); where the build lives and how the profile was named are not content.
    earlier = {n: ran.get(n, out / n) for n in report_stage.INPUTS if n in ran or (out / n).exists()}
    settings = {k_: v for k_, v in opts.__dict__.items() if k_ not in ("out", "profile")}
    stage(report_stage, report_stage.Config(profile.model_dump(), settings), earlier)
    return json.loads((out / "report" / "report.json").read_text())


def _choose_on_curve(curve: dict, profile, shape) -> dict:
    """The plan's choice made again on measured quality: the least compression meeting every budget."""
    from ..profiling.planner import Efficiency
    from .curve import least_compression, project_points

    c = curve["outputs"]
    points = project_points(c["points"], shape, profile, c["precision"], Efficiency(**c["efficiency"]))
    best = least_compression(points, profile)  # BudgetsUnmet (exit 1) names the closest point
    return {"sparsity": best.sparsity, "removed_blocks": best.k, "kept_blocks": shape.blocks - best.k,
            "quant": best.precision}
