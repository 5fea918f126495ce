"""Slow reference implementations the tests compare the engine against."""

from __future__ import annotations

import torch

from fusedeploy.compress.scores import _mean_cos


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
def removal_kl_bruteforce(model, adapter, ids: torch.Tensor, remove) -> float:
    """Reference fusegpt-evo criterion: mean token KL(dense || a copy with `remove` deleted), full forwards."""
    import copy

    import torch.nn.functional as F

    dense = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    pruned = copy.deepcopy(model)
    if remove:
        adapter.remove_blocks(pruned, sorted(remove))
    cut = F.log_softmax(pruned(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return float((dense.exp() * (dense - cut)).sum(-1).mean())
