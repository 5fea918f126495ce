"""A short healing pass after the last removal (beyond the paper; off unless `heal_steps` > 0).

Local distillation matches one group's hidden state at a time, so what users see, the next-token
distribution, is never trained directly and small errors of the groups add up. The healing pass
trains exactly that: logit distillation from the dense model (KL over the vocabulary at every
token) into a small LoRA on every linear layer of the kept blocks, then merged into the weights.

The teacher's logits need no second model: compression never touches the final norm or the LM
head, so they are the model's own head on the dense model's last hidden state, taken once for
every sequence before the first removal (one more fine-tuning set of activations on the host).

Neither model's logits are ever whole: a mini-batch's tokens x vocabulary logits (b x T x V x 4
bytes, 0.4 GB for 8 x 256 tokens and a 49k vocabulary, 4 GB for 8 x 2048 and 128k; the softmaxes,
the KL and their gradients are as many again) would be the largest tensors of the run. The
student's decoder runs once per step; its output is cut off the graph, the head and the KL run
on slices of tokens of at most LOGIT_ELEMENTS logits each, every slice's backward adds into the
output's gradient, and that gradient then runs back through the decoder once (the same idea as
chunked cross-entropy in training frameworks; the loss and gradients are the same sums, grouped
differently).

The LoRA is PEFT's: a plain additive adapter, whose layer computes `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` without
the full weight gradient the fusion terms need, merged back with `merge_and_unload` so the
checkpoint stays a stock one.

A model streamed from disk (streaming.py) is refused here, in one line, rather than healed block
by block: every step backpropagates a vocabulary-wide loss through all kept blocks, so streaming
it would read and write every block twice per step (forward, then backward with its activations
kept or recomputed), turning a 16-step pass into thousands of block reads, and the per-block
schedule would be a different algorithm from the one the in-memory run uses, so the two would no
longer write the same checkpoint. `--set heal_steps=0` runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .activations import ActivationStore
from .distill import lr_factor
from .runner import autocast_for
from .settings import CompressSettings


LOGIT_ELEMENTS = 1 << 24  # logits in one slice of the healing loss (64 MB in fp32)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) over the vocabulary per token: its mean over tokens, or (`"sum"`) its sum."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction=reduction)


def sliced_kl_backward(model: nn.Module, adapter, normed: torch.Tensor, dense_hidden: torch.Tensor) -> float:
    """Mean token KL of `model`'s head on `normed` (the decoder's output) against the dense head on
    `dense_hidden` (the dense last block's output), its gradient run back into `normed`'s graph.

    Returns the loss. Slices of tokens keep at most LOGIT_ELEMENTS logits of either model alive.
    """
    head = model.get_output_embeddings()
    leaf = normed.detach().flatten(0, -2).requires_grad_(True)
    dense = dense_hidden.flatten(0, -2)
    vocab = head.weight.shape[0]
    step = max(1, LOGIT_ELEMENTS // vocab)
    total = 0.0
    for start in range(0, len(leaf), step):
        with torch.no_grad():
            target = adapter.logits(model, dense[start:start + step])
        logits = adapter.cap_logits(model.config, head(leaf[start:start + step]))
        part = token_kl(logits, target, reduction="sum") / len(leaf)
        part.backward()
        total += float(part.detach())
        del target, logits, part
    normed.backward(leaf.grad.view_as(normed))
    return total


def _block_linear_names(model: nn.Module, adapter) -> list[str]:
    blocks = adapter.blocks(model)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(blocks) for name in adapter.linear_names(block)]


def heal(model: nn.Module, adapter, ids: torch.Tensor, dense_final: ActivationStore, settings: CompressSettings,
         device: torch.device, compute_dtype: torch.dtype,
         progress: Callable[..., None] | None = None) -> dict:
    """Distil the dense model's logits on `ids` [n, T] into a merged LoRA of `model`'s kept blocks, in place.

    `dense_final` holds the dense model's last hidden state (before the final norm) for each row of `ids`.

    Seeded: the LoRA's start and the order of the sequences follow `settings.seed`. Returns the
    record for compression.json (losses of the first and last steps).
    """
    from peft import LoraConfig, get_peft_model

    steps = settings.heal_steps
    batch = min(settings.batch_size, len(ids))
    torch.manual_seed(settings.seed * 1_000_033 + 17)  # PEFT draws the LoRA's A from the global generator
    config = LoraConfig(r=settings.heal_rank, lora_alpha=settings.heal_rank, lora_dropout=0.0, bias="none",
                        target_modules=_block_linear_names(model, adapter))
    student = get_peft_model(model, config)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.heal_lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)
    warmup = round(settings.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warmup))
    gen = torch.Generator().manual_seed(settings.seed * 1013 + 5)
    student.to(device).train()
    # each block keeps only its input for the backward and recomputes the rest there: one more
    # forward of the trunk per step (the host peak of a SmolLM2 step: 4.6 -> 2.7 GiB)
    checkpointed = bool(model.supports_gradient_checkpointing)
    if checkpointed:
        model.activation_checkpointing_enable({"use_reentrant": False})
    order: list[int] = []
    while len(order) < steps * batch:  # one shuffled pass after another
        order += torch.randperm(len(ids), generator=gen).tolist()
    index_batches = [torch.tensor(order[k * batch:(k + 1) * batch]) for k in range(steps)]
    losses = []
    decoder = adapter.decoder(model)  # PEFT put its LoRA layers into `model`'s own modules
    for step, (index, hidden) in enumerate(dense_final.gathered(index_batches)):
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, compute_dtype):
            normed = decoder(input_ids=ids[index].to(device), use_cache=False).last_hidden_state
            losses.append(sliced_kl_backward(model, adapter, normed, hidden))
        del normed, hidden
        opt.step()
        sched.step()
        if not math.isfinite(losses[-1]):  # the step already wrote NaN/Inf into the LoRA: nothing to keep
            raise UserError(f"the healing pass diverged: its loss became {losses[-1]} at step {step + 1} of "
                            f"{steps}; lower heal_lr (now {settings.heal_lr:g}) or set heal_steps=0, then start "
                            "over with --force")
        if progress:
            progress("heal", step + 1, steps, f"loss {losses[-1]:.4g} (start {losses[0]:.4g})")
    if checkpointed:
        model.activation_checkpointing_disable()
    student.merge_and_unload()  # folds the LoRA into the base weights of `model` itself
    model.eval().requires_grad_(False)
    tail = losses[-max(1, steps // 4):]
    return {"steps": steps, "rank": settings.heal_rank, "lr": settings.heal_lr, "sequences": len(ids),
            "loss_first": losses[0] if losses else None, "loss_last_quarter": sum(tail) / len(tail) if losses else None}
