"""The iterative compression driver: score → group → fuse → distill → fold → remove, resumable.

State after every completed iteration (removed blocks, the current blocks' weights, the
records) is written to `<out>.state/state.pt` through a temporary file and an atomic rename,
so a kill never leaves a half-written state. The final checkpoint is written to a temporary
folder beside `out_dir` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from .distill import distill_group, fold_group, group_range
from .fused import fold_model
from .activations import reset_stream_stats
from .runner import BlockRunner
from .scores import ActivationCache, bi_scores, mi_scores, sleb_scores
from .settings import METHODS, CompressSettings, load_recipe

log = logging.getLogger(__name__)

# method -> (score, iterative?, group mode or None)
METHOD_TABLE = {
    "fusegpt": ("mi", True, "learned"),
    "fusegpt-oneshot": ("mi", False, "learned"),
    "sleb": ("sleb", True, None),
    "shortgpt": ("bi", False, None),
    "mi": ("mi", True, None),
    "mi-lora": ("mi", True, "lora"),
    "static-fusion": ("mi", True, "static"),
}
STATE_VERSION = 1


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
    return state_dir(out_dir).is_dir()


def _finished(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compress_model(
    model_spec: str,
    out_dir,
    sparsity: float,
    method: str = "fusegpt",
    calib: str = "builtin",
    settings: CompressSettings | None = None,
    resume: bool = False,
    device=None,
    dtype=None,
    progress: Callable[..., None] | None = None,
    force: bool = False,
) -> dict:
    """Compress `model_spec` and write a stock Hugging Face checkpoint + compression.json to `out_dir`.

    `progress(kind, done, total, status)` is called with kind "iteration" (one per removed block),
    "score" (one per candidate block scored) and "epoch" (one per distillation epoch, status
    carries the loss). Returns compression.json.
    """
    from .. import __version__
    from ..data import load_text, sample_sequences, tokenize
    from ..models import adapter_for
    from ..models.loading import load_model, pick_device, pick_dtype

    started = time.time()
    settings = settings or load_recipe()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not 0 < sparsity < 1:
        raise UserError(f"sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    score_kind, iterative, mode = METHOD_TABLE[method]
    out = Path(out_dir)
    if _finished(out) and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    state_path = state_dir(out) / "state.pt"
    if state_path.exists() and not resume and not force:
        raise UserError(f"an unfinished run's state is at {state_path.parent}; pass --resume to continue it "
                        "or --force to start over")

    dev = device if isinstance(device, torch.device) else pick_device(device)
    compute_dtype = pick_dtype(dev, dtype if isinstance(dtype, str) or dtype is None else str(dtype).split(".")[-1])
    # fp32 master weights everywhere; bf16/fp16 compute on CUDA through autocast.
    model, tokenizer, _ = load_model(model_spec, device="cpu", dtype="float32")
    model.requires_grad_(False)
    adapter = adapter_for(model)
    n_blocks = len(adapter.blocks(model))
    n_remove = blocks_to_remove(n_blocks, sparsity)

    ids = tokenize(tokenizer, load_text(calib, purpose="calib"))
    need = settings.seq_len + 1
    if ids.numel() < need:
        raise UserError(f"too few calibration tokens: {calib!r} has {ids.numel()}, a sample of seq_len "
                        f"{settings.seq_len} needs {need}; give more text or a smaller seq_len")
    mi_ids = sample_sequences(ids, settings.mi_samples, settings.seq_len, settings.seed)
    ft_ids = sample_sequences(ids, settings.ft_samples, settings.seq_len, settings.seed + 1) if mode else None
    if mode in ("learned", "lora") and settings.epochs > 0 and settings.ft_samples < 2:
        raise UserError("local distillation needs ft_samples >= 2 (the KL softmax runs over the batch)")

    fingerprint = {"model": model_spec, "method": method, "sparsity": sparsity, "calib": calib,
                   "settings": settings.model_dump(), "device": dev.type, "dtype": str(compute_dtype)}
    original = list(range(n_blocks))  # current position -> original index
    removed: list[int] = []
    iterations: list[dict] = []
    plan: list[int] | None = None
    oneshot_scores = None
    elapsed_before = 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("version") != STATE_VERSION or state["fingerprint"] != fingerprint:
            raise UserError(f"the saved state at {state_path.parent} is from a different run "
                            "(model, method, sparsity, data, settings or device differ); use --force to start over")
        for orig in state["removed"]:
            idx = original.index(orig)
            adapter.remove_blocks(model, [idx])
            original.pop(idx)
            removed.append(orig)
        adapter.blocks(model).load_state_dict(state["blocks"])
        iterations, plan, oneshot_scores = state["iterations"], state["plan"], state["oneshot_scores"]
        elapsed_before = state["elapsed_s"]
        log.info("resuming after %d removed blocks", len(removed))
    elif state_path.exists():  # --force: start over
        shutil.rmtree(state_path.parent, ignore_errors=True)

    if not settings.offload:
        model.to(dev)
    stream_stats = reset_stream_stats()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runner = BlockRunner(model, adapter, dev, compute_dtype, offload=settings.offload)
    runner.capture_kwargs(settings.seq_len)
    batch = settings.score_batch
    cache = ActivationCache(runner, runner.block0_inputs(mi_ids, batch), batch)
    ft_x0 = runner.block0_inputs(ft_ids, batch) if mode and len(removed) < n_remove else None
    if not removed:
        log.info("compressing %s: %s, removing %d of %d blocks", model_spec, method, n_remove, n_blocks)
    if progress:
        progress("iteration", len(removed), n_remove, "")

    while len(removed) < n_remove:
        t_it = time.time()
        it = len(removed)
        n_now = len(runner.blocks)
        torch.manual_seed(settings.seed * 7919 + it)
        rec: dict = {"iteration": it, "blocks_before": n_now}
        if iterative or plan is None:
            if score_kind == "mi":
                scores = mi_scores(cache, progress)
            elif score_kind == "bi":
                scores = bi_scores(cache)
            else:
                scores = sleb_scores(model, adapter, cache, mi_ids, progress)
            rec[f"{score_kind}_scores"] = scores
            if not iterative:  # one-shot: the n_remove lowest of the original model, lowest first
                order = sorted(range(n_now), key=lambda i: scores[i])[:n_remove]
                plan = [original[i] for i in order]
                oneshot_scores = {"kind": score_kind, "scores": scores}
        rec["time_score_s"] = round(time.time() - t_it, 3)
        p = original.index(plan[it]) if not iterative else min(range(n_now), key=lambda i: scores[i])
        rec["removed_current"], rec["removed_original"] = p, original[p]
        lo = p
        if mode:
            t_d = time.time()
            lo, hi = group_range(n_now, p, settings.group_size)
            rec["group_original"] = [original[i] for i in range(lo, hi)]
            x = runner.run_range_batched(0, lo, ft_x0, batch)
            d = distill_group(runner, lo, hi, p, x, mode, settings, seed=settings.seed * 7919 + it,
                              progress=progress)
            rec["fold_error"] = fold_group(runner, lo, hi, p, x, batch)  # earlier terms become dense weights
            del x
            rec.update(d)
            rec["time_distill_s"] = round(time.time() - t_d, 3)
        runner.remove(p)
        removed.append(original.pop(p))
        if iterative and len(removed) < n_remove:
            del cache.states[lo + 1:]
            cache.refresh_from(lo)
        rec["time_s"] = round(time.time() - t_it, 3)
        iterations.append(rec)
        status = f"removed block {rec['removed_original']}"
        if "loss_after" in rec:
            status += f", loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g}"
        _atomic_save({"version": STATE_VERSION, "fingerprint": fingerprint, "removed": removed,
                      "blocks": {k: v.detach().cpu() for k, v in adapter.blocks(model).state_dict().items()},
                      "iterations": iterations, "plan": plan, "oneshot_scores": oneshot_scores,
                      "elapsed_s": elapsed_before + time.time() - started}, state_path)
        if progress:
            progress("iteration", len(removed), n_remove, status)

    fold_model(adapter, model)
    model.to("cpu")
    total = elapsed_before + time.time() - started
    report = {
        "fusedeploy_version": __version__, "model": model_spec, "method": method, "sparsity": sparsity,
        "calib": calib, "seed": settings.seed, "settings": settings.model_dump(),
        "device": str(dev), "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "architecture": model.config.model_type, "blocks_before": n_blocks, "blocks_after": n_blocks - len(removed),
        "removed_blocks": removed, "kept_blocks": original, "oneshot_scores": oneshot_scores,
        "iterations": iterations, "timings": {"total_s": round(total, 3),
                                              "iterations_s": round(sum(r["time_s"] for r in iterations), 3)},
        "resumed": bool(resume and elapsed_before),
        "memory": _memory_record(dev, stream_stats),
    }
    _write_output(model, tokenizer, report, out)
    shutil.rmtree(state_path.parent, ignore_errors=True)
    return report


def _memory_record(dev: torch.device, stream_stats) -> dict:
    """Peaks of this run: activations streamed to the device, all device memory, the process's RSS."""
    import resource

    rec = {"activation_stream_peak_bytes": stream_stats.peak_bytes,
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if dev.type == "cuda":
        rec["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return rec


def _write_output(model, tokenizer, report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "compression.json").write_text(json.dumps(report, indent=2))
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
