"""Partial groups, learnable fusion into the neighbours, local KL distillation (docs/algorithm.md, 2-4)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .activations import ActivationStore
from .fused import FusedLinear, effective_linear, fold_block, wrap_block
from .parallel import Ranks
from .repair_init import lstsq_init
from .runner import BlockRunner
from .settings import CompressSettings

log = logging.getLogger(__name__)


def group_range(n_blocks: int, p: int, group_size: int) -> tuple[int, int]:
    """[lo, hi): `group_size` neighbours plus p, split evenly, shifted inward at the ends."""
    size = min(group_size + 1, n_blocks)
    left = (size - 1) // 2
    lo = p - left
    hi = lo + size
    if lo < 0:
        lo, hi = 0, size
    if hi > n_blocks:
        lo, hi = n_blocks - size, n_blocks
    return lo, hi


def kl_batch_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax_b(Y) || softmax_b(Ŷ)) with the softmax along the batch dimension (authors' code)."""
    return F.kl_div(F.log_softmax(student.float(), dim=0), F.softmax(teacher.float(), dim=0), reduction="batchmean")


@dataclass(frozen=True)
class Repair:
    """How the neighbours of a removed block make up for it (a row of REPAIRS)."""

    fusion: str | None  # "learned": trained (B·A) ⊙ W_p; "static": fixed c · W_p; None: no fusion term
    lora: bool  # the neighbours also get a trainable LoRA (and their norms train)
    trains: bool  # run local distillation
    lora_lr: str  # the settings field holding the LoRA / norm learning rate


REPAIRS: dict[str, Repair] = {
    "fusion": Repair(fusion="learned", lora=True, trains=True, lora_lr="lr_other"),
    "static": Repair(fusion="static", lora=False, trains=False, lora_lr="lr_other"),
    # mi-lora: a zero-initialised LoRA at the paper's 9.65e-6 barely moves in a CPU budget,
    # so the ablation trains it at the fusion factors' rate (lr_mi_lora).
    "lora": Repair(fusion=None, lora=True, trains=True, lora_lr="lr_mi_lora"),
}


def attach_fusion(runner: BlockRunner, lo: int, hi: int, p: int, repair: Repair,
                  settings: CompressSettings) -> list[str]:
    """Wrap the neighbours' linears and add p's terms as the repair says.

    Earlier iterations were already folded into plain weights, so an already-fused neighbour's
    earlier terms and an already-fused p's own terms are materialized frozen matrices here
    (docs/algorithm.md, step 3, allows this; the function is unchanged).

    A term needs a neighbour linear of the same name and shape. In a hybrid family (Qwen 3.5:
    linear- and full-attention blocks) p's attention goes only into neighbours of its own kind;
    the names of p's linears that no neighbour took are returned (their weights are dropped
    with p, as its norms and other non-linear parameters are in every family).
    """
    adapter, blocks = runner.adapter, runner.blocks
    p_lin = {name: effective_linear(lin) for name, lin in adapter.block_linears(blocks[p]).items()}
    neighbours = [i for i in range(lo, hi) if i != p]
    coef = settings.static_coefficient
    if coef is None:
        coef = 1.0 / max(1, len(neighbours))
    taken: set[str] = set()
    for i in neighbours:
        layers = wrap_block(adapter, blocks[i], settings.lora_rank if repair.lora else 0, settings.lora_scale)
        if repair.fusion is None:
            continue
        for name, fl in layers.items():
            if name not in p_lin or p_lin[name][0].shape != fl.base.weight.shape:
                continue
            w_p, b_p = p_lin[name]
            fl.add_fusion(w_p, b_p, settings.fusion_rank,
                          static_coefficient=coef if repair.fusion == "static" else None)
            taken.add(name)
    return sorted(set(p_lin) - taken) if repair.fusion is not None else []


def _param_groups(runner: BlockRunner, neighbours: list[int], repair: Repair, settings: CompressSettings,
                  scale: float):
    fusion, other = [], []
    for i in neighbours:
        block = runner.blocks[i]
        fused_prefixes = []
        for name, mod in block.named_modules():
            if isinstance(mod, FusedLinear):
                fused_prefixes.append(name + ".")
                fusion += mod.fusion_parameters()
                other += mod.lora_parameters()
        if settings.train_norms:
            for name, prm in block.named_parameters():
                if not any(name.startswith(pre) for pre in fused_prefixes) and prm.dtype.is_floating_point:
                    other.append(prm)
    groups = []
    if fusion:
        groups.append({"name": "fusion", "params": fusion, "lr": settings.lr_fusion * scale})
    if other:
        groups.append({"name": "lora_norms", "params": other, "lr": getattr(settings, repair.lora_lr) * scale})
    return groups, fusion + other


@torch.no_grad()
def _eval_loss(runner, lo, hi, p, x: ActivationStore, y: ActivationStore, batch) -> float:
    """Mean KL over the full mini-batches (a short last one would change the batch softmax)."""
    losses = []
    with runner.on_device(lo, hi):
        for (s, xb), (_, yb) in zip(x.batches(batch), y.batches(batch)):
            if xb.shape[0] == batch:
                losses.append(float(kl_batch_loss(runner.run_range(lo, hi, xb, skip=p), yb)))
    return sum(losses) / max(1, len(losses))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (no warm-up: the paper's cosine)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def distill_group(runner: BlockRunner, lo: int, hi: int, p: int, x: ActivationStore, repair: Repair,
                  settings: CompressSettings, seed: int,
                  progress: Callable[..., None] | None = None, ranks: Ranks = Ranks(),
                  target: ActivationStore | None = None) -> dict:
    """Fuse p into its group's neighbours and train them to reproduce the group's original output.

    `x` is the group's input for every fine-tuning sequence; `target`, when given, is what the
    group without p should output instead (the dense model's hidden state at that depth), else
    the group's own output with p. Returns a record with the loss before/after and every attempt;
    on divergence (NaN or a final loss above the starting one) the neighbours are rolled back and
    training is retried with a lower learning rate.
    """
    batch = min(settings.batch_size, len(x))
    if batch < 2:
        raise ValueError("local distillation needs at least 2 sequences per mini-batch")
    y = target if target is not None else runner.run_range_batched(lo, hi, x, batch)  # teacher: the group with p
    init = lstsq_init(runner, lo, p, x, batch) if settings.repair_init == "lstsq" else None
    unfused = attach_fusion(runner, lo, hi, p, repair, settings)
    neighbours = [i for i in range(lo, hi) if i != p]
    loss_before = _eval_loss(runner, lo, hi, p, x, y, batch)
    if not math.isfinite(loss_before):  # no learning rate repairs NaN/Inf in the inputs or the weights
        raise UserError(f"local distillation cannot start: the group's loss is {loss_before} before any "
                        "training, so the model's weights or its activations hold NaN or Inf; check the model "
                        "(fusedeploy eval) and the calibration text")
    record = {"loss_before": loss_before, "loss_after": loss_before, "attempts": []}
    if init is not None:
        record["repair_init"] = init
    if unfused:  # p's linears no neighbour has (another kind of attention): dropped, said in compression.json
        record["unfused"] = unfused
        log.info("block %d: no neighbour of its kind within the group for %s; dropped", p, ", ".join(unfused))
    if not repair.trains or settings.epochs == 0:
        return record
    snapshot = {i: {k: v.detach().to("cpu", copy=True) for k, v in runner.blocks[i].state_dict().items()}
                for i in neighbours}
    steps_per_epoch = len(x) // batch
    total = max(1, steps_per_epoch * settings.epochs)
    warmup = round(settings.warmup * total)
    for attempt in range(settings.max_retries + 1):
        scale = settings.lr_backoff ** attempt
        groups, params = _param_groups(runner, neighbours, repair, settings, scale)
        record["attempts"].append({"lr_scale": scale,
                                   "trained": {g["name"]: sum(t.numel() for t in g["params"]) for g in groups}})
        for prm in params:
            prm.requires_grad_(True)
        opt = torch.optim.Adam(groups, betas=(settings.beta1, settings.beta2), eps=settings.eps, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
        gen = torch.Generator().manual_seed(seed * 1009 + attempt)
        diverged = None
        with runner.on_device(lo, hi):
            for epoch in range(settings.epochs):
                order = torch.randperm(len(x), generator=gen)
                index = [order[s * batch:(s + 1) * batch] for s in range(steps_per_epoch)]
                # Losses stay on the device and are read once per epoch: a read per step would stall
                # the GPU while the host gathers the next mini-batch. A NaN step is caught at the
                # epoch's end and rolled back like any other divergence.
                loss_sum = torch.zeros((), device=runner.device)
                local = [ranks.my_slice(i) for i in index]  # with several processes, each takes a share
                for (_, xb), (_, yb) in zip(x.gathered(local), y.gathered(index)):
                    yhat = ranks.whole_batch(runner.run_range(lo, hi, xb, skip=p))
                    loss = kl_batch_loss(yhat, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    ranks.sum_gradients(params)
                    opt.step()
                    sched.step()
                    loss_sum += loss.detach()
                epoch_loss = float(loss_sum) / max(1, steps_per_epoch)
                if not math.isfinite(epoch_loss):
                    diverged = "nan"
                    break
                if progress:
                    progress("epoch", epoch + 1, settings.epochs, f"loss {epoch_loss:.4g} (start {loss_before:.4g})")
        for prm in params:
            prm.requires_grad_(False)
        loss_after = float("nan") if diverged else _eval_loss(runner, lo, hi, p, x, y, batch)
        if not diverged and not math.isfinite(loss_after):
            diverged = "nan"
        if not diverged and loss_after > loss_before:
            diverged = "loss grew"
        record["attempts"][-1].update({"loss_after": loss_after, "status": diverged or "ok"})
        if not diverged:
            record["loss_after"] = loss_after
            return record
        log.warning("distillation %s (attempt %d, lr x%g); rolling back and retrying with a lower learning rate",
                    diverged, attempt + 1, scale)
        for i in neighbours:
            runner.blocks[i].load_state_dict(snapshot[i])
    record["loss_after"] = loss_before
    record["gave_up"] = True  # kept the untrained fusion (= p removed, neighbours unchanged)
    return record


@torch.no_grad()
def fold_group(runner: BlockRunner, lo: int, hi: int, p: int, x: ActivationStore, batch: int) -> float:
    """Fold the group's fused layers into dense weights; returns the fold error on one mini-batch.

    The error is max |folded - fused| / max |fused| of the group's output, both computed the way
    training ran (bf16 autocast on a GPU): the fold error compression.json records per group.
    """
    with runner.on_device(lo, hi):
        xb = next(iter(x.batches(batch)))[1]
        fused = runner.run_range(lo, hi, xb, skip=p).float()
        for i in range(lo, hi):
            fold_block(runner.adapter, runner.blocks[i])
        folded = runner.run_range(lo, hi, xb, skip=p).float()
    return float((folded - fused).abs().max() / fused.abs().max().clamp_min(1e-30))
