"""Block scores: Macro Influence (cached prefix), Block Influence (ShortGPT), SLEB calibration loss.

All work on a per-block activation cache of the *current* model for the
scoring set: `cache[k]` is the input of block k, `cache[N]` the last block's
output (before the final norm). Candidate `i` only runs blocks i+1..N-1 from
`cache[i]`; after a block is fused away, `ActivationCache.refresh_from(lo)`
recomputes only from the changed group onward.

Every state is an `ActivationStore` on the host; candidates are scored mini-batch by mini-batch,
so the device never holds more than a couple of mini-batches of activations. With offload
(blocks on the host) candidates advance block-major: each block visits the device once per
scoring round instead of once per candidate.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .activations import ActivationStore
from .runner import BlockRunner


class ActivationCache:
    def __init__(self, runner: BlockRunner, block0_input: ActivationStore, batch: int):
        self.runner = runner
        self.batch = batch
        self.states: list[ActivationStore] = [block0_input]
        self.refresh_from(0)

    @torch.no_grad()
    def refresh_from(self, start: int) -> None:
        """Recompute the inputs of blocks start+1.. (and the final output); earlier ones are kept."""
        n = len(self.runner.blocks)
        del self.states[start + 1:]
        h = self.states[start]
        for i in range(start, n):
            h = self.runner.run_range_batched(i, i + 1, h, self.batch)
            self.states.append(h)

    @property
    def final(self) -> ActivationStore:
        return self.states[-1]


def candidate_outputs(cache: ActivationCache) -> Iterator[tuple[int, Iterator[tuple[int, torch.Tensor]]]]:
    """For each current block i: (i, mini-batches (start, last hidden state of the model without block i))."""
    runner, b = cache.runner, cache.batch
    n = len(runner.blocks)
    if runner.offload:
        running = list(cache.states[:n])  # candidate i has skipped block i and waits at block i + 1
        for j in range(1, n):
            with runner.on_device(j, j + 1):
                for i in range(j):
                    running[i] = runner._batched(j, j + 1, running[i], b, None)
        for i in range(n):
            yield i, running[i].batches(b)
            running[i] = None
        return

    def suffix(i):
        with runner.on_device(i + 1, n):
            for s, h in cache.states[i].batches(b):
                yield s, runner.run_range(i + 1, n, h)

    for i in range(n):
        yield i, suffix(i)


class _CosMean:
    """Mean cosine similarity over every token, accumulated batch by batch."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
        self.total += float(cos.double().sum())
        self.count += cos.numel()

    @property
    def value(self) -> float:
        return self.total / max(1, self.count)


@torch.no_grad()
def mi_scores(cache: ActivationCache, progress=None) -> list[float]:
    """MI_i = 1 - mean cos(H(model), H(model without block i)), for every current block."""
    scores = []
    for i, batches in candidate_outputs(cache):
        cos = _CosMean()
        for (_, h), (_, ref) in zip(batches, cache.final.batches(cache.batch)):
            cos.add(ref, h)
        scores.append(1.0 - cos.value)
        if progress:
            progress("score", i + 1, len(cache.states) - 1, "MI")
    return scores


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = _CosMean()
    cos.add(a, b)
    return cos.value


@torch.no_grad()
def mi_scores_bruteforce(model, adapter, ids: torch.Tensor) -> list[float]:
    """Reference MI: full forwards of a copy of the model with each block removed (tests only)."""
    import copy

    def last_hidden(m):
        got = []
        hook = adapter.final_norm(m).register_forward_pre_hook(lambda mod, args: got.append(args[0]))
        try:
            m(input_ids=ids, use_cache=False)
        finally:
            hook.remove()
        return got[0]

    ref = last_hidden(model)
    scores = []
    for i in range(len(adapter.blocks(model))):
        pruned = copy.deepcopy(model)
        adapter.remove_blocks(pruned, [i])
        scores.append(1.0 - _mean_cos(ref, last_hidden(pruned)))
    return scores


@torch.no_grad()
def bi_scores(cache: ActivationCache) -> list[float]:
    """ShortGPT Block Influence: BI_i = 1 - mean cos(input of block i, its output)."""
    out = []
    for i in range(len(cache.states) - 1):
        cos = _CosMean()
        for (_, a), (_, b) in zip(cache.states[i].batches(cache.batch), cache.states[i + 1].batches(cache.batch)):
            cos.add(a, b)
        out.append(1.0 - cos.value)
    return out


@torch.no_grad()
def lm_loss_sum(model, adapter, runner: BlockRunner, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of a mini-batch of ids given the last block's output."""
    norm = adapter.final_norm(model)
    head = model.get_output_embeddings()
    with runner.autocast():
        logits = head(norm(hidden.to(head.weight.device)))
        logits = adapter.cap_logits(model.config, logits)
        tgt = ids[:, 1:].to(logits.device)
        total = float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten(), reduction="sum"))
    return total, tgt.numel()


@torch.no_grad()
def sleb_scores(model, adapter, cache: ActivationCache, ids: torch.Tensor, progress=None) -> list[float]:
    """SLEB: calibration LM loss of the model with each block removed (lowest = remove)."""
    runner = cache.runner
    out = []
    with runner._trunk_on_device():
        for i, batches in candidate_outputs(cache):
            total, count = 0.0, 0
            for s, h in batches:
                t, c = lm_loss_sum(model, adapter, runner, h, ids[s:s + h.shape[0]])
                total, count = total + t, count + c
            out.append(total / count)
            if progress:
                progress("score", i + 1, len(cache.states) - 1, "SLEB loss")
    return out
