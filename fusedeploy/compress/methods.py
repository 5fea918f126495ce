"""The compression methods, one row each: which scorer picks the block, and which repair follows.

A method is a scorer (MI, BI or SLEB, see `scores.py`), whether it re-scores after every removal,
a repair of the neighbours (`distill.REPAIRS`: learned fusion, static fusion, LoRA only, or
none), and, for a one-shot method, how its first scores become the set of blocks to remove
(`search.SELECTIONS`: the lowest scores, or an evolutionary search seeded by them). The driver
looks a method up here and never tests method names itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    scorer: str  # key of scores.SCORERS
    iterative: bool  # re-score after every removal (dynamic) or once (one-shot)
    repair: str | None  # key of distill.REPAIRS; None = plain removal
    about: str
    select: str = "score"  # one-shot methods: key of search.SELECTIONS (which set the first scores pick)

    def __post_init__(self):
        if self.iterative and self.select != "score":
            raise ValueError("an iterative method re-scores before every removal; only one-shot methods select a set")


REGISTRY: dict[str, Method] = {
    "fusegpt": Method("mi", True, "fusion", "FuseGPT: dynamic MI, learned fusion + LoRA, local distillation"),
    "fusegpt-oneshot": Method("mi", False, "fusion", "FuseGPT with MI scored once"),
    "fusegpt-evo": Method("mi", False, "fusion", "FuseGPT-Evo: MI seeds an evolutionary search over the removed "
                          "set (KL to the dense model), then FuseGPT's fusion", select="evo"),
    "sleb": Method("sleb", True, None, "SLEB: remove the block whose loss the calibration text misses least"),
    "shortgpt": Method("bi", False, None, "ShortGPT: Block Influence scored once, plain removal"),
    "mi": Method("mi", True, None, "dynamic MI, plain removal (ablation)"),
    "mi-lora": Method("mi", True, "lora", "dynamic MI, LoRA-only distillation (ablation)"),
    "static-fusion": Method("mi", True, "static", "dynamic MI, fixed W_n + c * W_p, untrained (ablation)"),
}
METHODS = tuple(REGISTRY)


def method(name: str) -> Method:
    from ..errors import UserError

    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
