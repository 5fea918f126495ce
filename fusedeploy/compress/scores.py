"""Block scores: Macro Influence (cached prefix), Block Influence (ShortGPT), SLEB calibration loss.

All work on a per-block activation cache of the *current* model for the
scoring set: `cache[k]` is the input of block k, `cache[N]` the last block's
output (before the final norm). Candidate `i` only runs blocks i+1..N-1 from
`cache[i]`; after a block is fused away, `ActivationCache.refresh_from(lo)`
recomputes only from the changed group onward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .runner import BlockRunner


class ActivationCache:
    def __init__(self, runner: BlockRunner, block0_input: torch.Tensor, batch: int):
        self.runner = runner
        self.batch = batch
        self.states: list[torch.Tensor] = [block0_input]
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
    def final(self) -> torch.Tensor:
        return self.states[-1]


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@torch.no_grad()
def mi_scores(cache: ActivationCache, progress=None) -> list[float]:
    """MI_i = 1 - mean cos(H(model), H(model without block i)), for every current block."""
    runner = cache.runner
    n = len(runner.blocks)
    scores = []
    for i in range(n):
        h = runner.run_range_batched(i + 1, n, cache.states[i], cache.batch)
        scores.append(1.0 - _mean_cos(cache.final, h))
        if progress:
            progress("score", i + 1, n, "MI")
    return scores


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
    return [1.0 - _mean_cos(cache.states[i], cache.states[i + 1]) for i in range(len(cache.states) - 1)]


@torch.no_grad()
def lm_loss(model, adapter, runner: BlockRunner, hidden: torch.Tensor, ids: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy of the calibration ids given the last block's output."""
    norm = adapter.final_norm(model)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with runner.autocast():
        for s in range(0, hidden.shape[0], batch):
            logits = head(norm(hidden[s:s + batch].to(head.weight.device)))
            softcap = getattr(model.config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            tgt = ids[s:s + batch, 1:].to(logits.device)
            total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten(), reduction="sum"))
            count += tgt.numel()
    return total / count


@torch.no_grad()
def sleb_scores(model, adapter, cache: ActivationCache, ids: torch.Tensor, progress=None) -> list[float]:
    """SLEB: calibration LM loss of the model with each block removed (lowest = remove)."""
    runner = cache.runner
    n = len(runner.blocks)
    out = []
    for i in range(n):
        h = runner.run_range_batched(i + 1, n, cache.states[i], cache.batch)
        out.append(lm_loss(model, adapter, runner, h, ids, cache.batch))
        if progress:
            progress("score", i + 1, n, "SLEB loss")
    return out
