"""Block scores: Macro Influence (cached prefix), Block Influence (ShortGPT), SLEB calibration loss.

All work on a per-block activation cache of the *current* model for the
scoring set: `cache[k]` is the input of block k, `cache[N]` the last block's
output (before the final norm). Candidate `i` only runs blocks i+1..N-1 from
`cache[i]`; after a block is fused away, `ActivationCache.refresh_from(lo)`
recomputes only from the changed group onward.

A block the family cannot remove (Gemma 4: one whose K/V later blocks read) scores +inf and is
not run as a candidate: the model without it is not one FuseDeploy would make.

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
from .parallel import Ranks
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

    def block_removed(self, changed_from: int) -> None:
        """A block at or after `changed_from` was removed (and its group repaired): recompute from there."""
        self.refresh_from(changed_from)

    @property
    def final(self) -> ActivationStore:
        return self.states[-1]


def candidate_outputs(cache: ActivationCache, which: list[int]) -> Iterator[tuple[int, Iterator]]:
    """For each block i in `which`: (i, mini-batches (start, last hidden state of the model without block i))."""
    runner, b = cache.runner, cache.batch
    n = len(runner.blocks)
    if runner.offload:
        running = {i: cache.states[i] for i in which}  # candidate i skipped block i, waits at block i + 1
        for j in range(1, n):
            waiting = [i for i in which if i < j]
            if waiting:
                with runner.on_device(j, j + 1):
                    for i in waiting:
                        running[i] = runner.run_store(j, j + 1, running[i], b, None)
        for i in which:
            yield i, running.pop(i).batches(b)
        return

    def suffix(i):
        with runner.on_device(i + 1, n):
            for s, h in cache.states[i].batches(b):
                yield s, runner.run_range(i + 1, n, h)

    for i in which:
        yield i, suffix(i)


def refused_blocks(runner: BlockRunner) -> set[int]:
    """Current blocks that cannot be removed on their own (`adapter.removal_refusal`)."""
    config = runner.model.config
    return {i for i in range(len(runner.blocks)) if runner.adapter.removal_refusal(config, [i]) is not None}


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
def mi_scores(cache: ActivationCache, progress=None, ranks: Ranks = Ranks()) -> list[float]:
    """MI_i = 1 - mean cos(H(model), H(model without block i)), for every current block."""
    n = len(cache.states) - 1
    refused = refused_blocks(cache.runner)
    mine = [i for i in ranks.mine(n) if i not in refused]
    scores = {i: float("inf") for i in ranks.mine(n) if i in refused}
    for k, (i, batches) in enumerate(candidate_outputs(cache, mine)):
        cos = _CosMean()
        for (_, h), (_, ref) in zip(batches, cache.final.batches(cache.batch)):
            cos.add(ref, h)
        scores[i] = 1.0 - cos.value
        if progress:
            progress("score", k + 1, len(mine), "MI")
    return ranks.share_scores(scores, n)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = _CosMean()
    cos.add(a, b)
    return cos.value


@torch.no_grad()
def bi_scores(cache: ActivationCache) -> list[float]:
    """ShortGPT Block Influence: BI_i = 1 - mean cos(input of block i, its output)."""
    out = []
    refused = refused_blocks(cache.runner)
    for i in range(len(cache.states) - 1):
        if i in refused:
            out.append(float("inf"))
            continue
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
def sleb_scores(model, adapter, cache: ActivationCache, ids: torch.Tensor, progress=None,
                ranks: Ranks = Ranks()) -> list[float]:
    """SLEB: calibration LM loss of the model with each block removed (lowest = remove)."""
    runner = cache.runner
    n = len(cache.states) - 1
    refused = refused_blocks(runner)
    mine = [i for i in ranks.mine(n) if i not in refused]
    out = {i: float("inf") for i in ranks.mine(n) if i in refused}
    with runner.trunk_on_device():
        for k, (i, batches) in enumerate(candidate_outputs(cache, mine)):
            total, count = 0.0, 0
            for s, h in batches:
                t, c = lm_loss_sum(model, adapter, runner, h, ids[s:s + h.shape[0]])
                total, count = total + t, count + c
            out[i] = total / count
            if progress:
                progress("score", k + 1, len(mine), "SLEB loss")
    return ranks.share_scores(out, n)


def _mi(cache, ids, progress, ranks):
    return mi_scores(cache, progress, ranks)


def _bi(cache, ids, progress, ranks):  # one pass over the cache: every rank computes it whole
    return bi_scores(cache)


def _sleb(cache, ids, progress, ranks):
    return sleb_scores(cache.runner.model, cache.runner.adapter, cache, ids, progress, ranks)


# scorer name -> f(cache, calibration ids, progress, ranks) -> one score per current block, lowest = remove
SCORERS = {"mi": _mi, "bi": _bi, "sleb": _sleb}
