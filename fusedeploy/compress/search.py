"""Which set of blocks a one-shot method removes: the lowest scores, or FuseGPT-Evo's search.

A one-shot method scores the dense model once (`scores.py`), then a *selection* turns those scores
into the ordered plan of blocks to remove; the driver looks it up in `SELECTIONS` by the method's
`select` field (`methods.py`) and never tests a method name.

- `score`: the `n_remove` lowest scores, lowest first (fusegpt-oneshot, shortgpt).
- `evo`: FuseGPT-Evo (paper appendix §1.2): an EvoPress-style evolutionary search over the removed
  set, seeded by the `n_remove` lowest MI scores.

The search's criterion (`removal_kl`) is the mean over every token of the scoring (MI) samples of
KL(dense next-token distribution || next-token distribution of the dense model with the set plainly
removed), each over the vocabulary. It is what the search can afford: plain removal, no fusion or
training per candidate, run from the cached block-0 inputs through the kept blocks and the model's
own final norm and head. The project's restatement of the appendix scores candidates on
"calibration loss"; the KL to the dense model is that loss measured against the dense model's own
distribution instead of the one-hot next token (EvoPress's choice as well), so it is zero for the
empty set and does not reward a removal for moving the model towards the text (docs/algorithm.md,
section 6).

The search is a (1 + λ) evolution with elitism. Generation 0 scores the seed set. Each of the
`evo_generations` generations then makes `evo_candidates` new sets from the best set so far, each
by one random move:
- `neighbour`: a removed block swaps with a kept neighbour (i ± 1): the removal shifts by one;
- `random`: a removed block swaps with a random kept block;
- `double`: two such random swaps at once.
A set already evaluated (or already made in this generation) is never evaluated again: the move is
redrawn (64 tries), then a random unevaluated set is drawn. When every set of `n_remove` blocks
has been evaluated the search stops early and records `exhausted`. The best set is the lowest KL
ever evaluated (ties: the earlier one, so the seed wins a tie), hence never worse than the seed by
this criterion. The moves draw from `random.Random` seeded by `settings.seed`: the same seed gives
the same search.

The chosen set is removed in ascending order of the seed MI scores (the block the dense model
misses least goes first), each fused and distilled exactly as fusegpt-oneshot does.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .parallel import Ranks
from .runner import BlockRunner
from .scores import ActivationCache

log = logging.getLogger(__name__)

MOVES = ("neighbour", "random", "double")
_RETRIES = 64  # redraws of a move that made a set already evaluated
_ENUMERATE_UP_TO = 50_000  # a space this small is listed when the moves find nothing new
_LOGIT_ELEMENTS = 1 << 25  # tokens x vocab per logits chunk: 128 MB in fp32 (a few live at once)


# -- the criterion -------------------------------------------------------------------------------
def _run_kept(runner: BlockRunner, kept: Sequence[int], h: torch.Tensor) -> torch.Tensor:
    with runner.autocast():
        for i in kept:
            h = runner.run_block(i, h)
    return h


@torch.no_grad()
def removal_kl(cache: ActivationCache, sets: Sequence[frozenset[int]]) -> list[float]:
    """For each set of current block indices: mean token KL(dense || the model without those blocks).

    `cache` is the activation cache of the dense model on the scoring samples: its block-0 inputs
    feed every candidate, its final state gives the dense logits. Samples go through in mini-batches
    of `cache.batch` and the logits in chunks of at most `_LOGIT_ELEMENTS` values, each chunk's dense
    log-probabilities computed once for all the sets, so nothing of size tokens x vocab is held for
    more than one chunk. With offload the blocks visit the device once per set (block-major) and each
    set's last hidden state waits on the host.
    """
    if not sets:
        return []
    runner, b = cache.runner, cache.batch
    model, adapter = runner.model, runner.adapter
    n = len(runner.blocks)
    refused = [adapter.removal_refusal(model.config, s) is not None for s in sets]
    if any(refused):  # a set the family cannot remove (Gemma 4: K/V others read) is never chosen
        values = iter(removal_kl(cache, [s for s, r in zip(sets, refused) if not r]))
        return [float("inf") if r else next(values) for r in refused]
    kept = [[i for i in range(n) if i not in s] for s in sets]
    x0, dense = cache.states[0], cache.final
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, _LOGIT_ELEMENTS // vocab)
    finals = None
    if runner.offload:
        finals = []
        for k in kept:
            h = x0
            for i in k:
                h = runner.run_store(i, i + 1, h, b, None)
            finals.append(h)
    totals, count = [0.0] * len(sets), 0
    with runner.trunk_on_device():
        streams = [f.batches(b) for f in finals] if finals is not None else None
        for (_, x), (_, ref) in zip(x0.batches(b), dense.batches(b)):
            hs = [next(st)[1] for st in streams] if streams is not None else [_run_kept(runner, k, x) for k in kept]
            ref = ref.flatten(0, -2)
            hs = [h.flatten(0, -2) for h in hs]
            for lo in range(0, ref.shape[0], rows):
                with runner.autocast():
                    p_log = F.log_softmax(adapter.logits(model, ref[lo:lo + rows]).float(), dim=-1)
                p = p_log.exp()
                for j, h in enumerate(hs):
                    with runner.autocast():
                        q_log = F.log_softmax(adapter.logits(model, h[lo:lo + rows]).float(), dim=-1)
                    totals[j] += float((p * (p_log - q_log)).sum(dtype=torch.float64))
                    del q_log
                del p, p_log
            count += ref.shape[0]
            del hs, ref
    return [t / max(1, count) for t in totals]


# -- the search ----------------------------------------------------------------------------------
def _swap(parent: frozenset[int], out: int, into: int) -> frozenset[int]:
    return (parent - {out}) | {into}


def _move(parent: frozenset[int], n: int, rng: random.Random) -> tuple[str, frozenset[int]]:
    """One random move from `parent` (a set of `k` of `n` blocks, 0 < k < n)."""
    removed = sorted(parent)
    kept = [i for i in range(n) if i not in parent]
    move = rng.choice(MOVES)
    if move == "neighbour":
        options = [(r, j) for r in removed for j in (r - 1, r + 1) if 0 <= j < n and j not in parent]
        if options:  # always, since 0 < k < n: some removed block borders a kept one
            r, j = rng.choice(options)
            return move, _swap(parent, r, j)
        move = "random"
    if move == "double" and len(removed) >= 2 and len(kept) >= 2:
        outs, ins = rng.sample(removed, 2), rng.sample(kept, 2)
        return move, (parent - set(outs)) | set(ins)
    return "random", _swap(parent, rng.choice(removed), rng.choice(kept))


def _new_set(parent: frozenset[int], n: int, taken, space: int,
             rng: random.Random) -> tuple[str, frozenset[int]] | None:
    """A set not in `taken`, made from `parent` by a move if possible; None when none is left."""
    if len(taken) >= space:
        return None
    for _ in range(_RETRIES):
        move, cand = _move(parent, n, rng)
        if cand not in taken:
            return move, cand
    k = len(parent)
    if space <= _ENUMERATE_UP_TO:
        left = [frozenset(c) for c in itertools.combinations(range(n), k) if frozenset(c) not in taken]
        return ("random-set", rng.choice(left)) if left else None
    while True:  # the space is far larger than what was evaluated: a draw is new almost surely
        cand = frozenset(rng.sample(range(n), k))
        if cand not in taken:
            return "random-set", cand


def evolve(n_blocks: int, seed_set: frozenset[int], fitness: Callable[[list[frozenset[int]]], list[float]],
           generations: int, candidates: int, seed: int, progress: Callable[..., None] | None = None) -> dict:
    """The evolutionary search over sets of `len(seed_set)` of `n_blocks` blocks; lower fitness is better.

    `fitness(sets)` scores one generation's sets at once. Returns the search's record (every
    evaluated set with its score, in order; the best set; whether the space ran out).
    """
    rng = random.Random(seed * 1_000_003 + 17)
    k = len(seed_set)
    if not 0 < k < n_blocks:
        raise ValueError(f"a search over sets of {k} of {n_blocks} blocks")
    space = math.comb(n_blocks, k)
    total = 1 + generations * candidates
    scored: dict[frozenset[int], float] = {}
    history: list[dict] = []

    def best() -> frozenset[int]:  # lowest score; on a tie the earliest evaluated (dict order)
        return min(scored, key=lambda s: scored[s])

    def evaluate(generation: int, batch: list[tuple[str, frozenset[int]]], end: int) -> None:
        """One generation's sets, scored together; then one progress call per set, in order."""
        values = fitness([s for _, s in batch])
        for (move, s), v in zip(batch, values):
            scored[s] = float(v)
            history.append({"generation": generation, "move": move, "set": sorted(s), "kl": float(v)})
            if progress:
                b = best()
                progress("search", len(history), end, f"best KL {scored[b]:.4g} (MI seed {scored[seed_set]:.4g})")

    evaluate(0, [("seed", seed_set)], total)
    exhausted = False
    for g in range(1, generations + 1):
        parent, batch, taken = best(), [], set(scored)
        for _ in range(candidates):
            made = _new_set(parent, n_blocks, taken, space, rng)
            if made is None:
                exhausted = True
                break
            batch.append(made)
            taken.add(made[1])
        if batch:  # when the space ran out the bar ends where the search did
            evaluate(g, batch, len(history) + len(batch) if exhausted else total)
        if exhausted:
            if not batch and progress:
                b = best()
                progress("search", len(history), len(history),
                         f"best KL {scored[b]:.4g} (MI seed {scored[seed_set]:.4g}); every set evaluated")
            break
    winner = best()
    return {"generations": generations, "candidates": candidates, "seed_set": sorted(seed_set),
            "seed_kl": scored[seed_set], "evaluated": history, "best_set": sorted(winner), "best_kl": scored[winner],
            "evaluations": len(history), "space": space, "exhausted": exhausted}


# -- the selections ------------------------------------------------------------------------------
def removal_order(candidates: Sequence[int], n_remove: int, runner: BlockRunner) -> list[int]:
    """The first `n_remove` of `candidates` (in their order) that the family can remove one after another.

    Most families take any; Gemma 4 refuses blocks whose K/V others read, and a last block whose
    predecessor is sliding attention until that one is gone, so a refused block waits for later.
    """
    config, adapter = runner.model.config, runner.adapter
    chosen: list[int] = []
    pending = list(candidates)
    while len(chosen) < n_remove:
        nxt = next((i for i in pending if adapter.removal_refusal(config, {*chosen, i}) is None), None)
        if nxt is None:
            why = adapter.removal_refusal(config, {*chosen, pending[0]}) if pending else "too few blocks"
            raise UserError(f"cannot remove {n_remove} of {len(runner.blocks)} blocks: {why}; lower the sparsity")
        chosen.append(nxt)
        pending.remove(nxt)
    return chosen


def _lowest(scores: list[float], n_remove: int, cache: ActivationCache, settings, progress,
            ranks: Ranks) -> tuple[list[int], dict | None]:
    """The `n_remove` lowest scores, lowest first (among blocks the family can remove in that order)."""
    return removal_order(sorted(range(len(scores)), key=lambda i: scores[i]), n_remove, cache.runner), None


def _evo(scores: list[float], n_remove: int, cache: ActivationCache, settings, progress,
         ranks: Ranks) -> tuple[list[int], dict]:
    """FuseGPT-Evo: the search seeded by the lowest scores; the best set, lowest seed score first."""
    t0 = time.time()
    n = len(scores)
    seed_order, _ = _lowest(scores, n_remove, cache, settings, progress, ranks)

    def fitness(sets: list[frozenset[int]]) -> list[float]:  # sets dealt out to ranks, as scoring does
        mine = ranks.mine(len(sets))
        values = removal_kl(cache, [sets[i] for i in mine])
        return ranks.share_scores(dict(zip(mine, values)), len(sets))

    record = evolve(n, frozenset(seed_order), fitness, settings.evo_generations, settings.evo_candidates,
                    settings.seed, progress)
    order = removal_order(sorted(record["best_set"], key=lambda i: (scores[i], i)), n_remove, cache.runner)
    x0 = cache.states[0]
    record = {"criterion": "mean token KL(dense || plain removal of the set) on the scoring samples",
              "tokens": int(x0.shape[0] * x0.shape[1]), **record, "order": order,
              "time_s": round(time.time() - t0, 3)}
    log.info("fusegpt-evo search: %d block sets in %.1f s%s; KL to dense %.4g (MI seed %s) -> %.4g (%s)",
             record["evaluations"], record["time_s"], ", every set evaluated" if record["exhausted"] else "",
             record["seed_kl"], record["seed_set"], record["best_kl"], record["best_set"])
    return order, record


@dataclass(frozen=True)
class Selection:
    """How a one-shot method's scores become its plan: `choose(scores, n_remove, cache, settings,
    progress, ranks) -> (current block indices in removal order, record for compression.json or None)`.

    `settings` names the CompressSettings fields only this selection reads: they stay out of the
    resumable state's fingerprint of every other method, so a state written before they existed
    still resumes.
    """

    choose: Callable[..., tuple[list[int], dict | None]]
    settings: tuple[str, ...] = ()


SELECTIONS: dict[str, Selection] = {
    "score": Selection(_lowest),
    "evo": Selection(_evo, ("evo_generations", "evo_candidates")),
}
