"""Partial groups, learnable fusion into the neighbours, and local KL distillation (FUSEGPT.md §2-4)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused import FusedLinear, effective_linear, wrap_block
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


def attach_fusion(runner: BlockRunner, lo: int, hi: int, p: int, mode: str, settings: CompressSettings) -> None:
    """Wrap the neighbours' linears and add p's terms.

    mode: "learned" (B·A ⊙ W_p, trained), "static" (fixed c · W_p) or "lora" (LoRA only, no fusion).
    Earlier iterations were already folded into plain weights, so an already-fused neighbour's
    earlier terms and an already-fused p's own terms are materialized frozen matrices here
    (FUSEGPT.md §3 allows this; the function is unchanged).
    """
    adapter, blocks = runner.adapter, runner.blocks
    p_lin = {name: effective_linear(lin) for name, lin in adapter.block_linears(blocks[p]).items()}
    neighbours = [i for i in range(lo, hi) if i != p]
    coef = settings.static_coefficient
    if coef is None:
        coef = 1.0 / max(1, len(neighbours))
    for i in neighbours:
        lora = settings.lora_rank if mode in ("learned", "lora") else 0
        layers = wrap_block(adapter, blocks[i], lora, settings.lora_scale)
        if mode == "lora":
            continue
        for name, fl in layers.items():
            w_p, b_p = p_lin[name]
            fl.add_fusion(w_p, b_p, settings.fusion_rank, static_coefficient=coef if mode == "static" else None)


def _param_groups(runner: BlockRunner, neighbours: list[int], mode: str, settings: CompressSettings, scale: float):
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
    lr_other = settings.lr_mi_lora if mode == "lora" else settings.lr_other
    groups = []
    if fusion:
        groups.append({"params": fusion, "lr": settings.lr_fusion * scale})
    if other:
        groups.append({"params": other, "lr": lr_other * scale})
    return groups, fusion + other


@torch.no_grad()
def _eval_loss(runner, lo, hi, p, x, y, batch) -> float:
    losses = []
    with runner.on_device(lo, hi):
        for s in range(0, x.shape[0] - batch + 1, batch):
            yhat = runner.run_range(lo, hi, x[s:s + batch], skip=p)
            losses.append(float(kl_batch_loss(yhat, y[s:s + batch])))
    return sum(losses) / max(1, len(losses))


def distill_group(runner: BlockRunner, lo: int, hi: int, p: int, x: torch.Tensor, mode: str,
                  settings: CompressSettings, seed: int,
                  progress: Callable[..., None] | None = None) -> dict:
    """Fuse p into its group's neighbours and train them to reproduce the group's original output.

    `x` is the group's input for every fine-tuning sequence. Returns a record with the loss
    before/after and every attempt; on divergence (NaN or a final loss above the starting one)
    the neighbours are rolled back and training is retried with a lower learning rate.
    """
    batch = min(settings.batch_size, x.shape[0])
    if batch < 2:
        raise ValueError("local distillation needs at least 2 sequences per mini-batch")
    y = runner.run_range_batched(lo, hi, x, batch)  # teacher: the group with p
    attach_fusion(runner, lo, hi, p, mode, settings)
    neighbours = [i for i in range(lo, hi) if i != p]
    loss_before = _eval_loss(runner, lo, hi, p, x, y, batch)
    record = {"loss_before": loss_before, "loss_after": loss_before, "attempts": [], "mode": mode}
    if mode == "static" or settings.epochs == 0:
        return record
    snapshot = {i: {k: v.detach().clone() for k, v in runner.blocks[i].state_dict().items()} for i in neighbours}
    steps_per_epoch = x.shape[0] // batch
    total = max(1, steps_per_epoch * settings.epochs)
    for attempt in range(settings.max_retries + 1):
        scale = settings.lr_backoff ** attempt
        groups, params = _param_groups(runner, neighbours, mode, settings, scale)
        for prm in params:
            prm.requires_grad_(True)
        opt = torch.optim.Adam(groups, betas=(settings.beta1, settings.beta2), eps=settings.eps, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        gen = torch.Generator().manual_seed(seed * 1009 + attempt)
        diverged = None
        with runner.on_device(lo, hi):
            for epoch in range(settings.epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                epoch_losses = []
                for s in range(steps_per_epoch):
                    idx = order[s * batch:(s + 1) * batch].to(x.device)
                    yhat = runner.run_range(lo, hi, x[idx], skip=p)
                    loss = kl_batch_loss(yhat, y[idx])
                    if not torch.isfinite(loss):
                        diverged = "nan"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    epoch_losses.append(loss.item())
                if diverged:
                    break
                if progress:
                    progress("epoch", epoch + 1, settings.epochs,
                             f"loss {sum(epoch_losses) / max(1, len(epoch_losses)):.4g} (start {loss_before:.4g})")
        for prm in params:
            prm.requires_grad_(False)
        loss_after = float("nan") if diverged else _eval_loss(runner, lo, hi, p, x, y, batch)
        if not diverged and not math.isfinite(loss_after):
            diverged = "nan"
        if not diverged and loss_after > loss_before:
            diverged = "loss grew"
        record["attempts"].append({"lr_scale": scale, "loss_after": loss_after, "status": diverged or "ok"})
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


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
