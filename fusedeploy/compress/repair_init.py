"""A training-free start for the repair: the removed block replaced by a least-squares linear map.

Beyond the paper, off by default (`repair_init=lstsq`). Training-free depth pruning (ReplaceMe,
Shopkhoev et al., 2025) replaces removed blocks by one linear map estimated on calibration
activations and folds it into the block before them. Here that map starts FuseGPT's repair:
it is folded into the preceding neighbour before the fusion terms are attached and distilled.

With X the removed block's input, Y its output and D the preceding block's last residual write
(its MLP output projection: X = h + D, h the residual before that write), the block is modelled as
Y ~ h + D (I + Delta). Delta solves the ridge problem min |D Delta - (Y - X)|^2 + lam |Delta|^2,
so it shrinks toward Delta = 0, which is plain removal; the fit never does worse than plain removal
on the calibration tokens. Folding is exact: the projection's weight W becomes (I + Delta)^T W.

Written by hand: no library fits and folds a map into a Hugging Face block. Families whose residual
write passes a norm first (Gemma's post-feedforward norm) cannot take the fold; their adapter names
no `residual_linear`, and the setting is refused in one line.
"""

from __future__ import annotations

import time

import torch

from .activations import ActivationStore
from .runner import BlockRunner

RIDGE = 1e-3  # lam as a share of DᵀD's mean diagonal: keeps the solve stable where D is nearly rank-deficient


@torch.no_grad()
def lstsq_init(runner: BlockRunner, lo: int, p: int, x: ActivationStore, batch: int) -> dict:
    """Fold the least-squares map for block p into block p - 1 (both current indices); a record of the fit.

    `x` is the input of block `lo` (the group's first) for every distillation sequence. The record
    gives the squared residual of plain removal (Delta = 0) and of the fit, summed over the tokens.
    """
    name = runner.adapter.residual_linear
    t0 = time.perf_counter()
    if p - 1 < lo:
        return {"method": "lstsq", "skipped": "no block before the removed one in its group"}
    proj = runner.blocks[p - 1].get_submodule(name)
    d = proj.weight.shape[0]
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, d, dtype=torch.float64)
    plain = torch.zeros((), dtype=torch.float64)
    tokens = 0
    written: list[torch.Tensor] = []
    handle = proj.register_forward_hook(lambda mod, args, out: written.append(out))
    try:
        with runner.on_device(lo, p + 1):
            for _, h in x.batches(batch):
                written.clear()
                before = runner.run_range(lo, p, h)  # ends with block p - 1: the hook holds its write
                after = runner.run_range(p, p + 1, before)
                # products on the device in fp32, sums over batches on the host in fp64: nothing
                # tokens x hidden is copied or widened
                write = written[-1].reshape(-1, d).float()
                miss = (after - before).reshape(-1, d).float()
                gram += (write.T @ write).double().cpu()
                cross += (write.T @ miss).double().cpu()
                plain += float((miss * miss).sum())
                tokens += write.shape[0]
    finally:
        handle.remove()
    lam = RIDGE * float(gram.diagonal().mean())
    delta = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), cross)
    # |E - D Delta|^2 = |E|^2 - 2 tr(Deltaᵀ DᵀE) + tr(Deltaᵀ DᵀD Delta), from the sums above
    fit = plain - 2 * (delta * cross).sum() + (delta * (gram @ delta)).sum()
    weight = proj.weight
    folded = weight.double() + delta.T.to(weight.device) @ weight.double()
    weight.copy_(folded.to(weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((proj.bias.double() + proj.bias.double() @ delta.to(proj.bias.device)).to(proj.bias.dtype))
    return {"method": "lstsq", "into": name, "tokens": tokens, "residual_plain": float(plain),
            "residual_fit": float(fit), "ridge": RIDGE, "time_s": round(time.perf_counter() - t0, 3)}
