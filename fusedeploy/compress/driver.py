"""The iterative compression driver: score → group → repair → fold → remove, resumable.

`compress_model` runs one `CompressJob` (settings.py) and reads top to bottom as its three phases:
`_setup` (check the job, load the model and the calibration samples), `_restore` (continue a saved
run) and `_iterate` (one removed block per iteration, state saved after each). A method is a scorer
plus a repair, looked up in `methods.REGISTRY`, and for a one-shot method a selection of the set to
remove (`search.SELECTIONS`); the activation cache recomputes what a removal invalidates.

State after every completed iteration goes to `<out>.state/` (see `state.py`: JSON and
safetensors, written so a kill never leaves a half-written state). The final checkpoint is
written to a temporary folder beside the job's `out` and renamed into place.

Host memory is planned before anything loads (`hostplan.py`): a model whose in-memory run does
not fit `max_host_memory` is streamed (`streaming.py`): its blocks are read from the checkpoint
when used, a changed block is kept as a file of the state, and the output is written block by
block (`shards.py`) into the same files the in-memory path writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import outputs, preflight
from ..errors import UserError
from ..models.loading import save_tokenizer
from . import hostplan
from . import state as saved_state
from . import steps as steps_mod
from .calibration import SELF, self_calibration
from .activations import ActivationStore, StreamStats, reset_stream_stats, spilling
from .distill import REPAIRS, Repair, distill_group, fold_group, group_range
from .fused import fold_model
from .heal import heal
from .methods import Method, method as lookup_method
from .parallel import Ranks, from_environment, local_device
from .runner import BlockRunner, check_compute_dtype, default_compute_dtype, emulated_bf16_warning
from .scores import SCORERS, ActivationCache
from .shards import ShardedWriter, entries_of
from .streaming import StreamedBlocks, open_model as open_streamed
from .search import SELECTIONS
from .settings import CompressJob, CompressSettings

log = logging.getLogger(__name__)


# Settings that came after resumable states were first written, with the value that turns each off.
LATER_SETTINGS_OFF = {"repair_init": "none", "self_greedy_tokens": 0, "self_prompt_tokens": 0, "self_builtin_share": 0.0,
                     "self_sample_tokens": 0}
_ON = object()  # no setting equals it


def blocks_to_remove(n_blocks: int, sparsity: float) -> int:
    if not 0 < sparsity < 1:
        raise UserError(f"sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    n = math.ceil(n_blocks * sparsity - 1e-9)
    if n >= n_blocks:
        raise UserError(f"sparsity {sparsity} would remove {n} of the model's {n_blocks} blocks; at least one must remain")
    return n


def state_dir(out_dir) -> Path:
    """Where an unfinished run writing `out_dir` keeps its resumable state (beside the output)."""
    out = Path(out_dir)
    return out.with_name(out.name + ".state")


def has_resumable_state(out_dir) -> bool:
    return saved_state.exists(state_dir(out_dir))


# What this module and steps.py write in a state folder: the state, its weights, the kept steps,
# and the temporaries of their atomic writes (`<name>.<random>.tmp`, see state._atomic_write).
_STATE_FILES = re.compile(r"(state\.json|blocks-\d+\.safetensors|block-\d+\.\d+\.safetensors)"
                          r"(\.[A-Za-z0-9_]+\.tmp)?")
_STEP_FILES = re.compile(r"step-\d+\.(json|safetensors)(\.[A-Za-z0-9_]+\.tmp)?")


def _state_entries(folder: Path) -> tuple[list[Path], list[str]]:
    """(files FuseDeploy wrote, names of everything else) in a state folder, its steps/ folder included."""
    ours, foreign = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name == steps_mod.FOLDER and entry.is_dir() and not entry.is_symlink():
            for step in sorted(entry.iterdir()):
                plain = step.is_file() and not step.is_symlink()
                (ours if plain and _STEP_FILES.fullmatch(step.name) else foreign).append(step)
        elif entry.is_file() and not entry.is_symlink() and _STATE_FILES.fullmatch(entry.name):
            ours.append(entry)
        else:
            foreign.append(entry)
    return ours, [str(p.relative_to(folder)) for p in foreign]


def _discard_state(folder: Path) -> None:
    """--force: remove a state folder, only if every entry in it is one FuseDeploy writes."""
    _, foreign = _state_entries(folder)
    if foreign:
        raise UserError(f"{folder} holds files FuseDeploy did not write ({', '.join(foreign[:3])}); "
                        "move them away, then run again")
    shutil.rmtree(folder)


def _remove_state(folder: Path) -> None:
    """A finished run's state goes: our files, then the folders if that left them empty.

    Anything else someone put there stays, with the folder, and one warning line says so.
    """
    if not folder.is_dir():
        return
    ours, foreign = _state_entries(folder)
    for f in ours:
        f.unlink(missing_ok=True)
    for d in (folder / steps_mod.FOLDER, folder):
        with contextlib.suppress(OSError):  # not empty (or not there): kept
            d.rmdir()
    if foreign:
        log.warning("kept %s: it holds files FuseDeploy did not write (%s); only the run's own state was removed",
                    folder, ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else ""))


def non_finite_weight(modules: list[torch.nn.Module]) -> str | None:
    """The name of the first weight holding NaN or Inf, else None (a cheap scan of the tensors).

    A streamed model's blocks not in memory (meta tensors) are skipped: each is checked when read.
    """
    for module in modules:
        for name, prm in module.named_parameters():
            if prm.device.type != "meta" and not bool(torch.isfinite(prm).all()):
                return name
    return None


def standard_json(value):
    """`value` with every non-finite float as null: compression.json is read by other tools, and JSON
    has no Infinity (a block the family cannot remove scores +inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def require_finite(modules: list[torch.nn.Module], what: str) -> None:
    """One line, and no output, when training left NaN or Inf in any weight."""
    name = non_finite_weight(modules)
    if name is not None:
        raise UserError(f"{what} holds NaN or Inf weights ({name}); the run diverged and nothing was "
                        "written -- lower the learning rates (--set lr_fusion=..., lr_other=..., "
                        "heal_lr=...) and start over with --force")


@dataclass
class _Run:
    """Everything one compression run holds: its job, what the job resolves to, and what the phases fill in."""

    job: CompressJob
    method: Method
    repair: Repair | None
    device: torch.device
    compute_dtype: torch.dtype
    ranks: Ranks
    model: torch.nn.Module = None
    tokenizer: object = None
    adapter: object = None
    n_blocks: int = 0
    n_remove: int = 0
    mi_ids: torch.Tensor = None
    ft_ids: torch.Tensor | None = None
    original: list[int] = field(default_factory=list)  # current position -> original index
    removed: list[int] = field(default_factory=list)
    iterations: list[dict] = field(default_factory=list)
    plan: list[int] | None = None  # one-shot methods: the original indices to remove, in order
    oneshot_scores: dict | None = None
    search: dict | None = None  # a selection's record (fusegpt-evo: the search), saved with the plan
    elapsed_before: float = 0.0
    dense_states: list[ActivationStore] | None = None  # target "dense": the dense model's input of every block
    dense_final: ActivationStore | None = None  # healing: the dense model's last hidden state per sequence
    heal_record: dict | None = None
    host_plan: hostplan.Plan | None = None
    stream: object = None  # streaming.StreamedBlocks when the blocks are read from disk
    started: float = field(default_factory=time.time)

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    @property
    def offload(self) -> bool:
        """Blocks stay off the compute device between uses (asked for, or streamed from disk)."""
        return self.settings.offload or self.streamed

    @property
    def settings(self) -> CompressSettings:
        return self.job.settings

    @property
    def out(self) -> Path:
        return Path(self.job.out)

    @property
    def state_folder(self) -> Path:
        return state_dir(self.out)

    def fingerprint(self) -> dict:
        """What must match for a saved state to be resumed. Settings that only another method's selection
        reads (fusegpt-evo's), and settings added later while they are off (`LATER_SETTINGS_OFF`), are left
        out, so states written before those settings existed still resume."""
        job = self.job
        others = {name for key, sel in SELECTIONS.items() if key != self.method.select for name in sel.settings}
        settings = {k: v for k, v in job.settings.model_dump().items()
                    if k not in others and LATER_SETTINGS_OFF.get(k, _ON) != v}
        return {"model": job.model, "method": job.method, "sparsity": job.sparsity, "calib": job.calib,
                "calib_part": job.calib_part,
                "settings": settings, "device": self.device.type,
                "dtype": str(self.compute_dtype), "world": self.ranks.world, "keep_steps": job.keep_steps,
                **({"streamed": True} if self.streamed else {})}  # another state format (state.py)


def compress_model(job: CompressJob, progress: Callable[..., None] | None = None) -> dict:
    """Compress `job.model` and write a stock Hugging Face checkpoint + compression.json to `job.out`.

    `job.keep_steps` also keeps what rebuilds the model after every removal (`steps.rebuild`): the
    quality-vs-sparsity curve from one run. `job.calib_part` ("calib") reads only the calibration part
    of a text that evaluation shares (`data.split`).

    `progress(kind, done, total, status)` is called with kind "calibration" (one per batch of
    self-written calibration samples), "iteration" (one per removed block),
    "score" (one per candidate block scored), "search" (fusegpt-evo: one per block set evaluated,
    status carries the best KL so far), "epoch" (one per distillation epoch, status
    carries the loss) and "heal" (one per healing step). Under torchrun every process calls this; rank 0 writes. Returns compression.json.
    """
    with outputs.claim(job.out):  # one writer per output; clears our own half-written temporaries
        return _compress(job, progress)


def _compress(job: CompressJob, progress) -> dict:
    if outputs.secondary_rank():  # rank 0 alone reports
        progress = None
    run = _setup(job, progress)
    with spilling(run.out if run.host_plan.spill else None):  # activations in mapped files when the plan says so
        _keep_dense(run)
        if job.resume and saved_state.exists(run.state_folder):
            _restore(run)
        elif run.state_folder.exists() and run.ranks.main:  # --force, or a folder without a state: start over
            _discard_state(run.state_folder)
        stats = _iterate(run, progress)
    if run.dense_final is not None:
        with hostplan.freed_memory_returned():  # its peak: 2.17 -> 0.96 GiB on SmolLM2 for 16-22 % more time
            run.heal_record = heal(run.model, run.adapter, run.ft_ids, run.dense_final, run.settings, run.device,
                                   run.compute_dtype, progress)
        run.model.to("cpu")
    # nothing non-finite is ever written as an output (streamed: the trunk here, each block as it is written)
    require_finite([run.model], "the compressed model")
    report = _report(run, stats)
    if run.ranks.main:
        write_output(run.model, run.tokenizer, report, run.out,
                     steps_dir=run.state_folder / steps_mod.FOLDER if job.keep_steps else None,
                     save_weights=(lambda folder: write_streamed_weights(run, folder)) if run.streamed else None)
        _remove_state(run.state_folder)
    run.ranks.barrier()
    return report


def _check_family(location: Path, settings: CompressSettings) -> None:
    """A family FuseDeploy cannot compress, or whose blocks cannot take the settings, is refused from its
    config.json, before any weights load (a GGUF file's family is checked once it is loaded)."""
    from ..models import adapter_for

    if not (location.is_dir() and (location / "config.json").is_file()):
        return  # a GGUF file: its family is known once loaded
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except Exception:  # noqa: BLE001 - load_model reports unreadable configs in its own words
        return
    adapter = adapter_for(config)
    refusal = adapter.refusal(config, "compress")
    if refusal:
        raise UserError(f"cannot compress {adapter.family} ({config.model_type}): {refusal}")
    _check_repair_init(adapter, settings)


def _check_repair_init(adapter, settings: CompressSettings) -> None:
    if settings.repair_init == "lstsq" and adapter.residual_linear is None:
        raise UserError(f"repair_init=lstsq folds a linear map into the block's last residual write, and "
                        f"{adapter.family} blocks pass it through a norm first; drop --set repair_init=lstsq")


def _setup(job: CompressJob, progress=None) -> _Run:
    from ..data import sample_sequences
    from ..models import adapter_for
    from ..models.loading import load_model, pick_device, pick_dtype

    settings = job.settings
    chosen = lookup_method(job.method)
    if not 0 < job.sparsity < 1:
        raise UserError(f"sparsity must be between 0 and 1 (exclusive), got {job.sparsity}")
    out = Path(job.out)
    location = preflight.model_location(job.model)
    if settings.repair_init != "none" and not chosen.repair:
        raise UserError(f"repair_init starts a repair, and method {job.method!r} repairs nothing (plain removal); "
                        "drop --set repair_init or choose a method that repairs, e.g. fusegpt")
    _check_family(location, settings)
    outputs.check_separate(out, [location, None if job.calib == SELF else job.calib])
    outputs.check_replaceable(out, job.force)
    preflight.check_writable(out, preflight.weights_bytes(location), folder=True)
    if saved_state.exists(state_dir(out)) and not job.resume and not job.force:
        raise UserError(f"an unfinished run's state is at {state_dir(out)}; pass --resume to continue it "
                        "or --force to start over")
    dev = job.device if isinstance(job.device, torch.device) else pick_device(job.device)
    ranks = from_environment(dev.type)
    if ranks.active and settings.batch_size % ranks.world:
        raise UserError(f"batch_size {settings.batch_size} does not split over {ranks.world} processes; "
                        f"use a multiple of {ranks.world}")
    dev = local_device(dev, ranks)
    dtype = job.dtype if isinstance(job.dtype, str) or job.dtype is None else str(job.dtype).split(".")[-1]
    compute_dtype = pick_dtype(dev, dtype) if dtype else default_compute_dtype(dev)
    check_compute_dtype(dev, compute_dtype)
    if slow := emulated_bf16_warning(dev, compute_dtype):
        log.warning(slow)
    repair = REPAIRS[chosen.repair] if chosen.repair else None
    run = _Run(job, chosen, repair, dev, compute_dtype, ranks)
    run.host_plan = _plan_host_memory(job, repair, dev, compute_dtype)

    # fp32 master weights everywhere; bf16/fp16 compute on CUDA through autocast.
    if run.host_plan.mode == "streamed":
        _check_streamable(job, repair, ranks)
        run.model, run.tokenizer, checkpoint, prefix = open_streamed(job.model)
        run.stream = StreamedBlocks(checkpoint, prefix, adapter_for(run.model).blocks(run.model), state_dir(out))
        log.info("streaming %s from disk: about %.2f GB of host memory planned, %.2f GB allowed%s", job.model,
                 run.host_plan.streamed / hostplan.GB, run.host_plan.budget / hostplan.GB,
                 "; activations spilled to disk" if run.host_plan.spill else "")
    else:
        run.model, run.tokenizer, _ = load_model(job.model, device="cpu", dtype="float32")
    run.model.requires_grad_(False)
    broken = non_finite_weight([run.model])
    if broken is not None:  # would surface as NaN scores, a sampler crash or a NaN loss much later
        raise UserError(f"the model {job.model} holds NaN or Inf weights ({broken}); it cannot be compressed")
    run.adapter = adapter_for(run.model)
    _check_repair_init(run.adapter, settings)
    run.n_blocks = len(run.adapter.blocks(run.model))
    run.n_remove = blocks_to_remove(run.n_blocks, job.sparsity)
    run.original = list(range(run.n_blocks))

    fine_tunes = bool(repair)
    if settings.heal_steps and repair and repair.trains and settings.offload:
        raise UserError("the healing pass (heal_steps) trains the whole model on the device at once; "
                        "set heal_steps=0 or offload=false")
    if job.calib == SELF:  # data-free: the dense model writes its own calibration text
        n_ft = settings.ft_samples if fine_tunes else 0
        ids = self_calibration(run.model, run.tokenizer, settings.mi_samples + n_ft, settings,
                               report=(lambda done, total: progress("calibration", done, total, "sequences sampled"))
                               if progress else None)
        run.mi_ids, run.ft_ids = ids[:settings.mi_samples], (ids[settings.mi_samples:] if fine_tunes else None)
    else:
        ids = calibration_tokens(run.tokenizer, job.calib, job.calib_part, settings.seq_len)
        run.mi_ids = sample_sequences(ids, settings.mi_samples, settings.seq_len, settings.seed)
        if fine_tunes:
            run.ft_ids = sample_sequences(ids, settings.ft_samples, settings.seq_len, settings.seed + 1)
    if repair and repair.trains and settings.epochs > 0 and settings.ft_samples < 2:
        raise UserError("local distillation needs ft_samples >= 2 (the KL softmax runs over the batch)")
    return run


def _plan_host_memory(job: CompressJob, repair: Repair | None, dev: torch.device,
                      compute_dtype: torch.dtype) -> hostplan.Plan:
    """The in-memory or the streamed plan, from the model's config alone; a one-line refusal when neither fits."""
    from ..models.loading import load_config, resolve_model

    budget = hostplan.budget_bytes(job.max_host_memory)
    shapes = hostplan.meta_shapes(load_config(resolve_model(job.model)))
    act_bytes = torch.empty((), dtype=compute_dtype).element_size()
    force, resumed = job.stream, None
    if force is None and job.resume and saved_state.exists(state_dir(job.out)):
        force = resumed = saved_state.streamed(state_dir(job.out))  # a resume continues the way the run began
    planned = hostplan.plan(shapes, job.settings, repair, act_bytes, dev.type == "cpu", budget, force)
    if resumed is False and planned.in_memory > planned.budget:
        raise UserError(f"the saved state at {state_dir(job.out)} was made with the whole model in memory, which needs "
                        f"about {planned.in_memory / hostplan.GB:.2f} GB and --max-host-memory is "
                        f"{planned.budget / hostplan.GB:.2f} GB; resume with more, or start over with --force")
    return planned


def _check_streamable(job: CompressJob, repair: Repair | None, ranks: Ranks) -> None:
    """What a streamed run cannot do, refused before any weight is read."""
    settings = job.settings
    if ranks.active:  # rank 0 alone writes the changed blocks the others would have to read back
        raise UserError("the model is streamed from disk (it does not fit --max-host-memory), which runs in one "
                        "process; run without torchrun, or raise --max-host-memory")
    if job.calib == SELF:
        raise UserError("the model is streamed from disk (it does not fit --max-host-memory), and sampling its own "
                        "calibration text would read every block for every token; give a text with --calib")
    if settings.heal_steps and repair and repair.trains:
        raise UserError("the model is streamed from disk (it does not fit --max-host-memory), and the healing "
                        "pass trains every kept block at once; set heal_steps=0 (--set heal_steps=0)")


def calibration_tokens(tokenizer, calib: str, calib_part: str | None, seq_len: int) -> torch.Tensor:
    """The tokens of a calibration text, refused in one line when not even one sample fits in them.

    A build calls this in its preflight too, so a short `--calib` stops before any stage runs.
    """
    from ..data import load_text, text_part, tokenize

    text = load_text(calib, purpose="calib")
    ids = tokenize(tokenizer, text_part(text, calib_part) if calib_part else text)
    need = seq_len + 1
    if ids.numel() < need:
        part = f" (its {calib_part} part)" if calib_part else ""
        raise UserError(f"too few calibration tokens: {calib!r}{part} has {ids.numel()}, a sample of seq_len "
                        f"{seq_len} needs {need}; give more text or a smaller seq_len")
    return ids


def _keep_dense(run: _Run) -> None:
    """What the beyond-the-paper options need from the dense model, taken before a resume changes it.

    Both train, so both follow methods whose repair trains. Dense targets hold the fine-tuning
    set's hidden state at every block boundary on the host ((blocks + 1) times the fine-tuning
    activations); healing needs only the last one.
    """
    s = run.settings
    trains = bool(run.repair and run.repair.trains)
    wants_targets = trains and s.target == "dense" and s.epochs > 0
    if not (wants_targets or (trains and s.heal_steps)):
        return
    if not run.offload:
        run.model.to(run.device)
    runner = BlockRunner(run.model, run.adapter, run.device, run.compute_dtype, offload=s.offload, stream=run.stream)
    runner.capture_kwargs(s.seq_len)
    x0 = runner.block0_inputs(run.ft_ids, s.score_batch)
    if wants_targets:
        run.dense_states = ActivationCache(runner, x0, s.score_batch).states
        final = run.dense_states[-1]
    else:
        final = runner.run_range_batched(0, len(runner.blocks), x0, s.score_batch)
    if s.heal_steps:
        run.dense_final = final


def _restore(run: _Run) -> None:
    """Continue from the last completed iteration; the fingerprint is checked before any weight is read."""
    facts, blocks = saved_state.load(run.state_folder, run.fingerprint())
    for orig in facts["removed"]:
        idx = run.original.index(orig)
        run.adapter.remove_blocks(run.model, [idx])
        run.original.pop(idx)
        run.removed.append(orig)
    if run.streamed:  # the changed blocks' files; the others are still the checkpoint's
        run.stream.files = {int(k): v for k, v in facts.get("block_files", {}).items()}
    elif blocks is not None:  # None: saved before the first removal, the blocks are the dense model's
        run.adapter.blocks(run.model).load_state_dict(blocks)
    run.iterations, run.plan, run.oneshot_scores = facts["iterations"], facts["plan"], facts["oneshot_scores"]
    run.search = facts.get("search")  # absent from states written before fusegpt-evo
    run.elapsed_before = facts["elapsed_s"]
    log.info("resuming after %d removed blocks%s", len(run.removed),
             " (the plan is the saved one: no new selection)" if run.plan is not None else "")


def _iterate(run: _Run, progress) -> StreamStats:
    """Remove blocks one per iteration until the target count; saves the state after each."""
    settings, dev = run.settings, run.device
    if not run.offload:
        run.model.to(dev)
    stats = reset_stream_stats()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runner = BlockRunner(run.model, run.adapter, dev, run.compute_dtype, offload=settings.offload, stream=run.stream)
    runner.capture_kwargs(settings.seq_len)
    batch = settings.score_batch
    cache = ActivationCache(runner, runner.block0_inputs(run.mi_ids, batch), batch)
    ft_x0 = runner.block0_inputs(run.ft_ids, batch) if run.repair and len(run.removed) < run.n_remove else None
    if not run.removed:
        log.info("compressing %s: %s, removing %d of %d blocks", run.job.model, run.job.method, run.n_remove,
                 run.n_blocks)
    if progress:
        progress("iteration", len(run.removed), run.n_remove, "")
    while len(run.removed) < run.n_remove:
        rec = _one_iteration(run, runner, cache, ft_x0, progress)
        run.iterations.append(rec)
        if run.ranks.main and run.job.keep_steps:
            changed = [o for o in rec.get("group_original", []) if o != rec["removed_original"]]
            steps_mod.save_step(run.state_folder / steps_mod.FOLDER, len(run.removed), rec["removed_original"],
                                list(run.original),
                                {o: _block_state(run, runner.blocks[run.original.index(o)]) for o in changed},
                                {"sparsity_removed": len(run.removed) / run.n_blocks})
        _save_state(run)
        if progress:
            status = f"removed block {rec['removed_original']}"
            if "loss_after" in rec:
                status += f", loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g}"
            progress("iteration", len(run.removed), run.n_remove, status)
    fold_model(run.adapter, run.model)  # streamed: every group was folded in its iteration; a no-op
    if not run.streamed:
        run.model.to("cpu")
    return stats


def _block_state(run: _Run, block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A block's weights, read back from its file when the model is streamed."""
    return run.stream.read(block) if run.streamed else block.state_dict()


def _save_state(run: _Run, weights: bool = True) -> None:
    """Rank 0 saves the resumable state; `weights` False before the first removal (dense blocks).

    A streamed run names its changed blocks' files instead (written during the iteration).
    """
    if run.ranks.main:
        facts = {"fingerprint": saved_state.normalized(run.fingerprint()), "removed": run.removed,
                 "iterations": run.iterations, "plan": run.plan, "oneshot_scores": run.oneshot_scores,
                 "search": run.search, "elapsed_s": run.elapsed_before + time.time() - run.started}
        if run.streamed:
            saved_state.save(run.state_folder, facts, None, block_files=dict(run.stream.files) if weights else {})
        else:
            saved_state.save(run.state_folder, facts, run.adapter.blocks(run.model).state_dict() if weights else None)
    run.ranks.barrier()


def _one_iteration(run: _Run, runner: BlockRunner, cache: ActivationCache, ft_x0: ActivationStore | None,
                   progress) -> dict:
    settings, m = run.settings, run.method
    t_it = time.time()
    it = len(run.removed)
    n_now = len(runner.blocks)
    torch.manual_seed(settings.seed * 7919 + it)
    rec: dict = {"iteration": it, "blocks_before": n_now}
    if m.iterative or run.plan is None:
        scores = SCORERS[m.scorer](cache, run.mi_ids, progress, run.ranks)
        rec[f"{m.scorer}_scores"] = scores
        if not m.iterative:  # one-shot: the selection (lowest scores, or a search) plans every removal
            order, run.search = SELECTIONS[m.select].choose(scores, run.n_remove, cache, settings, progress,
                                                            run.ranks)
            run.plan = [run.original[i] for i in order]
            run.oneshot_scores = {"kind": m.scorer, "scores": scores}
            if run.search is not None:  # a costly selection is saved at once: a resume never redoes it
                _save_state(run, weights=False)
    elif it == 0 and run.oneshot_scores:  # resumed after the selection: iteration 0 records its scores as ever
        rec[f"{m.scorer}_scores"] = run.oneshot_scores["scores"]
    rec["time_score_s"] = round(time.time() - t_it, 3)
    p = min(range(n_now), key=lambda i: scores[i]) if m.iterative else run.original.index(run.plan[it])
    rec["removed_current"], rec["removed_original"] = p, run.original[p]
    changed_from = p
    if run.repair:
        t_d = time.time()
        lo, hi = group_range(n_now, p, settings.group_size)
        changed_from = lo
        rec["group_original"] = [run.original[i] for i in range(lo, hi)]
        x = runner.run_range_batched(0, lo, ft_x0, settings.score_batch)
        target = run.dense_states[run.original[hi - 1] + 1] if run.dense_states else None
        with runner.held(lo, hi):  # streamed: the group stays in memory while it is fused, trained and folded
            rec.update(distill_group(runner, lo, hi, p, x, run.repair, settings, seed=settings.seed * 7919 + it,
                                     progress=progress, ranks=run.ranks, target=target))
            rec["fold_error"] = fold_group(runner, lo, hi, p, x, settings.score_batch)
            # checked before the state is saved: a resumable state never holds NaN/Inf weights
            require_finite([runner.blocks[i] for i in range(lo, hi)],
                           f"the group around block {run.original[p]} after its distillation")
            if run.streamed and run.ranks.main:
                for i in range(lo, hi):
                    if i != p:
                        run.stream.save(runner.blocks[i], it + 1)
        del x
        rec["time_distill_s"] = round(time.time() - t_d, 3)
    runner.remove(p)
    run.removed.append(run.original.pop(p))
    if m.iterative and len(run.removed) < run.n_remove:
        cache.block_removed(changed_from)
    rec["time_s"] = round(time.time() - t_it, 3)
    return rec


def _report(run: _Run, stats: StreamStats) -> dict:
    from .. import __version__

    total = run.elapsed_before + time.time() - run.started
    job, s = run.job, run.settings
    return {
        "fusedeploy_version": __version__, "model": job.model, "method": job.method, "sparsity": job.sparsity,
        "calib": job.calib, "calib_part": job.calib_part, "seed": s.seed, "settings": s.model_dump(),
        "device": str(run.device), "compute_dtype": str(run.compute_dtype).replace("torch.", ""),
        "processes": run.ranks.world,
        "architecture": run.model.config.model_type, "blocks_before": run.n_blocks,
        "blocks_after": run.n_blocks - len(run.removed), "removed_blocks": run.removed, "kept_blocks": run.original,
        "oneshot_scores": run.oneshot_scores, "search": run.search, "iterations": run.iterations,
        "heal": run.heal_record,
        "timings": {"total_s": round(total, 3), "iterations_s": round(sum(r["time_s"] for r in run.iterations), 3),
                    **({"search_s": run.search["time_s"]} if run.search else {})},
        "resumed": bool(job.resume and run.elapsed_before),
        "memory": {**_memory_record(run.device, stats), "host_plan": run.host_plan.record()},
    }


def _memory_record(dev: torch.device, stream_stats) -> dict:
    """Peaks of this run: activations streamed to the device, all device memory, the process's RSS."""
    import resource

    rec = {"activation_stream_peak_bytes": stream_stats.peak_bytes,
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if dev.type == "cuda":
        rec["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return rec


def write_streamed_weights(run: _Run, folder: Path) -> None:
    """A streamed model's checkpoint, block by block, as `save_pretrained` lays it out (shards.py).

    `save_pretrained` with no tensors writes config.json and generation_config.json exactly as for
    the whole model; the trunk's tied weights are dropped as it drops them.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model, stream = run.model, run.stream
    model.save_pretrained(folder, state_dict={})
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    blocks = run.adapter.blocks(model)
    with ShardedWriter(folder, entries_of(state.items()), model.num_parameters()) as writer:
        for name, t in state.items():
            if not name.startswith(stream.prefix):
                writer.put(name, t)
        for j, block in enumerate(blocks):
            tensors = stream.read(block)
            bad = next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                       None)
            if bad is not None:
                raise UserError(f"the compressed model holds NaN or Inf weights ({stream.prefix}{j}.{bad}); "
                                "nothing was written -- lower the learning rates and start over with --force")
            for n, t in tensors.items():
                writer.put(f"{stream.prefix}{j}.{n}", t)
            del tensors


def write_output(model, tokenizer, report: dict, out: Path, steps_dir: Path | None = None,
                 save_weights: Callable[[Path], None] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    outputs.mark(tmp, "compressed-model")  # the output never exists unmarked
    try:
        if save_weights is None:
            model.save_pretrained(tmp)
        else:
            save_weights(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if steps_dir is not None:
            shutil.copytree(steps_dir, tmp / steps_mod.FOLDER,  # the steps only, nobody else's files
                            ignore=lambda _, names: [n for n in names if not _STEP_FILES.fullmatch(n)
                                                     or n.endswith(".tmp")])
        (tmp / "compression.json").write_text(json.dumps(standard_json(report), indent=2, allow_nan=False))
        if out.exists():  # --force: swap the old output away only once the new one is complete
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
