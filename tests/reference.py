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
