"""How much host memory a compression run needs, planned against `--max-host-memory` before any work.

Two plans are priced from the model's shapes (its config, built on the meta device: no weights
read) and the run's settings: the whole model in memory, and the model streamed from its
safetensors (streaming.py): embeddings, final norm and head resident, blocks read when used. The
run takes the in-memory plan when it fits, else the streamed one; when the activation sets do not
fit beside even that, they are spilled to memory-mapped files (activations.py); when one group
cannot fit at all, the run is refused in one line before anything is loaded. The formula, term by
term, is in docs/compression.md ("Models larger than host memory"); the upper-case constants
below are its measured terms, each with its measurement. This module also owns the one allocator
setting that changes what a run holds (`freed_memory_returned`).

Everything is in bytes; "this process" is its resident memory when planning (the interpreter,
torch and the libraries), counted because the budget is the machine's, not the run's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError

GB = 1e9

# While a group trains, every fused linear builds its fp32 effective weight, and autograd keeps the
# (B·A) product and the Hadamard product for the backward pass: up to three weight-sized tensors per
# neighbour beyond its master copy (fused.py, FusedLinear.delta_weight); a GPU keeps these on the
# device instead. An upper bound, not a fit: on the CPU, a group of 3 blocks of 3.1 MB added 31 MB
# at its peak where the plan counts 45 MB for the group (64-block test model, 2026-12-03).
GROUP_TRAINING_COPIES = 3
# What a run adds to the process measured when planning, beyond the terms below: the libraries' code
# pages its first forward and backward touch (file-backed, but resident), the run's own module
# objects, the libraries' workspaces, allocator slack. On the streaming test's 96-block model
# (2026-12-07, 2-core box, idle; cold processes, 8 runs each) a streamed run added 52-66 MB in fp32
# and 65-77 MB in bf16 where the other terms count 29-31 MB, about 32-37 MB of it code pages; a CI
# run added 99 MB, 70 MB beyond the terms. Rounded up from that.
RUN_OVERHEAD = 100 * 1_000_000
# The healing pass holds, beyond its checkpointed inputs and LoRA: one slice of its loss, several
# logit-sized fp32 tensors at once (the student's logits, both log-softmaxes, the KL terms, their
# gradients; heal.py), and the block being recomputed for its backward, with its intermediate
# activations and their gradients, a few times its linears' inputs and outputs. Both counts are
# fitted, not derived: `benchmarks/heal_memory.py` on SmolLM2 (22 blocks, 8 x 256 tokens, the
# allocator as the pass sets it) grew by 0.96 GiB with 2^24 logits a slice and 0.64 GiB with
# 2^22 (2026-12-06): 7 slice copies, and 5 x the block term for the rest.
HEAL_LOGIT_COPIES = 7
HEAL_BLOCK_COPIES = 5
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@dataclass(frozen=True)
class Shapes:
    """What the plan reads from a model: sizes in fp32 bytes, and the widths activations have."""

    n_blocks: int
    block_bytes: int  # the largest block's fp32 master copy
    trunk_bytes: int  # embeddings, final norm, head (tied ones once)
    linear_sides: int  # Σ (in + out) over one block's linear layers: the factors' sizes scale with it
    hidden: int
    vocab: int


def shapes_of(model, adapter) -> Shapes:
    """Sizes from parameter shapes only: works on a model built on the meta device."""
    blocks = adapter.blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    seen: set[int] = set()
    trunk = 0
    for p in model.parameters():
        if id(p) not in inside and id(p) not in seen:
            seen.add(id(p))
            trunk += p.numel() * 4
    block_bytes = max(sum(p.numel() for p in b.parameters()) * 4 for b in blocks)
    sides = max(sum(sum(lin.weight.shape) for lin in adapter.block_linears(b).values()) for b in blocks)
    return Shapes(len(blocks), block_bytes, trunk, sides, int(model.config.hidden_size),
                  int(model.get_output_embeddings().weight.shape[0]))


def meta_model(config):
    """The model of `config` with its parameters on the meta device (fp32 shapes, no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def meta_shapes(config) -> Shapes:
    from ..models import adapter_for

    return shapes_of(meta_model(config), adapter_for(config))


@dataclass(frozen=True)
class Plan:
    budget: int
    process: int  # this process before any weight is loaded
    in_memory: int  # peak of the in-memory run, this process included
    streamed: int  # peak of the streamed run with the activations in memory
    streamed_spilled: int  # ... with the activations in memory-mapped files
    activations: int
    mode: str  # "in-memory" | "streamed"
    spill: bool

    def record(self) -> dict:
        return asdict(self)


def _activations(shapes: Shapes, settings, act_bytes: int, repair, streamed: bool) -> int:
    unit = settings.seq_len * shapes.hidden * act_bytes  # one sequence's hidden states
    n = shapes.n_blocks
    mi = settings.mi_samples * unit
    total = (n + 1) * mi  # the scoring cache: every block's input, and the last output
    if streamed:
        total += n * mi  # block-major scoring carries every candidate's state forward at once
    if repair is not None:
        ft = settings.ft_samples * unit
        total += 4 * ft  # block-0 inputs, the group's input, its teacher, and one being computed
        if repair.trains and settings.target == "dense" and settings.epochs > 0:
            total += (n + 1) * ft
        if repair.trains and settings.heal_steps:
            total += ft
    return total


def _step_tokens(settings) -> int:
    """Tokens in one optimizer step's mini-batch (distillation and healing alike)."""
    return min(settings.batch_size, settings.ft_samples) * settings.seq_len


def _group(shapes: Shapes, settings, repair, on_cpu: bool, act_bytes: int) -> int:
    """What a group's repair adds to its blocks' master copies (which the in-memory plan already counts)."""
    if repair is None:
        return 0
    g = min(settings.group_size, shapes.n_blocks - 1)
    b = shapes.block_bytes
    extra = g * b if repair.fusion else 0  # each neighbour's fp32 copy of p's weights (W_p)
    if repair.trains and settings.epochs > 0:
        extra += g * b  # the snapshot a diverged attempt rolls back to
        ranks = settings.fusion_rank * bool(repair.fusion) + settings.lora_rank * repair.lora
        extra += g * 16 * ranks * shapes.linear_sides  # factors: values, gradients, two Adam moments
        extra += (g + 1) * _step_tokens(settings) * shapes.linear_sides * act_bytes  # every linear's ends, kept for the backward
        if on_cpu:
            extra += GROUP_TRAINING_COPIES * g * b
    return extra


def heal_bytes(shapes: Shapes, settings, repair, act_bytes: int) -> int:
    """What the healing pass adds to the in-memory run (a streamed run refuses the pass); it follows the
    last group's distillation, so the two never add up."""
    if repair is None or not repair.trains or not settings.heal_steps:
        return 0
    from .heal import LOGIT_ELEMENTS

    tokens = _step_tokens(settings)
    n = shapes.n_blocks  # every kept block (fewer than this by the removed ones)
    inputs = n * tokens * shapes.hidden * act_bytes  # each checkpointed block keeps its input for the backward
    block = HEAL_BLOCK_COPIES * tokens * shapes.linear_sides * act_bytes  # the block recomputed in the backward
    lora = 16 * settings.heal_rank * shapes.linear_sides * n  # LoRA values, gradients, two Adam moments
    logits = min(LOGIT_ELEMENTS, tokens * shapes.vocab)  # one slice's
    return inputs + block + lora + HEAL_LOGIT_COPIES * logits * 4


def plan(shapes: Shapes, settings, repair, act_bytes: int, on_cpu: bool, budget: int | None,
         force_stream: bool | None = None) -> Plan:
    """The plan for one run, or a one-line refusal when even one group cannot fit in `budget`."""
    process = resident_bytes()
    fixed = process + RUN_OVERHEAD
    budget = machine_bytes() if budget is None else budget
    g = min(settings.group_size, shapes.n_blocks - 1)
    group = _group(shapes, settings, repair, on_cpu, act_bytes)
    acts_mem = _activations(shapes, settings, act_bytes, repair, streamed=False)
    acts_str = _activations(shapes, settings, act_bytes, repair, streamed=True)
    whole = shapes.n_blocks * shapes.block_bytes + shapes.trunk_bytes
    in_memory = fixed + whole + acts_mem + max(group, heal_bytes(shapes, settings, repair, act_bytes))
    held = (g + 1 if repair is not None else 1) + 1  # the group (or the block scored), and one being read
    base = fixed + shapes.trunk_bytes + held * shapes.block_bytes + group
    streamed, spilled = base + acts_str, base
    if force_stream is False or (force_stream is None and in_memory <= budget):
        return Plan(budget, process, in_memory, streamed, spilled, acts_mem, "in-memory", False)
    if spilled > budget:
        raise UserError(
            f"this run needs about {spilled / GB:.2f} GB of host memory even with its blocks streamed from disk "
            f"(a group of {g + 1} blocks with its training copies {(held * shapes.block_bytes + group) / GB:.2f} GB, "
            f"embeddings and head {shapes.trunk_bytes / GB:.2f} GB, this process and its run {fixed / GB:.2f} GB) and "
            f"--max-host-memory is {budget / GB:.2f} GB; raise --max-host-memory or shrink the group "
            f"(--set group_size=N, now {settings.group_size})")
    return Plan(budget, process, in_memory, streamed, spilled, acts_str, "streamed", streamed > budget)


def _mallopt(param: int, value: int) -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return
    if mallopt is not None:  # glibc; a no-op elsewhere
        mallopt(param, value)


def return_freed_memory() -> None:
    """From now on in this process, glibc gives back what it frees (see `freed_memory_returned`)."""
    _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's own starting value, now fixed


@contextmanager
def freed_memory_returned():
    """While inside, glibc maps every buffer over 128 kB on allocation and unmaps it when freed.

    glibc raises its mmap threshold each time a large buffer is freed (up to 32 MB); tensors below
    it then come from the heap, which keeps what was freed, so resident memory climbs well above
    what is ever live at once. Fixing the threshold at glibc's starting value keeps it at what is
    live, and costs a page fault per page of every new buffer. Measured on SmolLM2-135M
    (2026-12-06, 2-core box, idle): two healing steps added 2.17 GiB to their process with the
    dynamic threshold and 0.96 GiB with it fixed, 32 s against 39 s (`benchmarks/heal_memory.py`);
    one distillation iteration of the `cpu` recipe peaked at 3.01 against 2.42 GB but took 1.9x
    as long, so only the healing pass and streamed runs (whose budget is the point, from before
    the model is opened: `return_freed_memory`) use it. Leaving restores the largest threshold the
    dynamic rule reaches (glibc cannot go back to the rule itself).
    """
    return_freed_memory()
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def machine_bytes() -> int:
    """The machine's physical memory, or the container's limit when it has a lower one (cgroup v2, then v1)."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def budget_bytes(gb: float | None) -> int | None:
    """`--max-host-memory GB` in bytes (None: the machine's); a value that is no size is refused."""
    if gb is None:
        return None
    if not (isinstance(gb, (int, float)) and math.isfinite(gb) and gb > 0):
        raise UserError(f"--max-host-memory must be a positive number of GB, got {gb}")
    return int(gb * GB)
