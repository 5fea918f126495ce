"""Every intermediate model of an iterative run, kept as what rebuilds it exactly.

Iteration k removes one block and changes only the blocks of its group, so after iteration k the
folded model is the k-block answer: a run that stops at k computes the very same weights. Rather
than a full checkpoint per k (hundreds of MB each), step k stores the group's blocks as they left
the iteration, keyed by their original block index, and which block went. Rebuilding step k is
the original model with steps 1..k replayed: the removals in order, each step's blocks loaded.
The files sit in `<output>/steps/` (safetensors + JSON, nothing pickled).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError

FOLDER = "steps"


def save_step(folder: Path, k: int, removed_original: int, kept: list[int],
              blocks: dict[int, dict[str, torch.Tensor]], extra: dict) -> None:
    """Step k: original block `removed_original` went; `blocks` (original index -> its state_dict) changed."""
    from safetensors.torch import save_file

    from .state import _atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{orig}.{name}": t.detach().to("cpu").contiguous()
               for orig, state in blocks.items() for name, t in state.items()}
    _atomic_write(folder / f"step-{k}.safetensors", lambda tmp: save_file(tensors, tmp))
    facts = {"k": k, "removed_original": removed_original, "kept_blocks": kept,
             "changed_blocks": sorted(blocks), **extra}
    _atomic_write(folder / f"step-{k}.json", lambda tmp: Path(tmp).write_text(json.dumps(facts)))


def available(output: Path) -> list[int]:
    """The k of every step kept in a finished output, ascending."""
    folder = Path(output) / FOLDER
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.json"))


def step_facts(output: Path, k: int) -> dict:
    return json.loads((Path(output) / FOLDER / f"step-{k}.json").read_text())


def replay(output, last: int | None = None):
    """Yield (k, model, tokenizer) for k = 0 (the original) .. `last`, one model replayed step by step.

    The same model object is modified in place between yields: use or save each before the next.
    """
    from safetensors.torch import load_file

    from ..models import adapter_for
    from ..models.loading import load_model

    output = Path(output)
    kept_steps = available(output)
    last = kept_steps[-1] if last is None and kept_steps else (last or 0)
    if last and last not in kept_steps:
        raise UserError(f"{output} keeps no step {last}; it has {kept_steps or 'none'} "
                        "(compress with --keep-steps)")
    report = json.loads((output / "compression.json").read_text())
    model, tokenizer, _ = load_model(report["model"], device="cpu", dtype="float32")
    model.requires_grad_(False)
    adapter = adapter_for(model)
    original = list(range(len(adapter.blocks(model))))
    yield 0, model, tokenizer
    for j in range(1, last + 1):
        facts = step_facts(output, j)
        idx = original.index(facts["removed_original"])
        adapter.remove_blocks(model, [idx])
        original.pop(idx)
        weights = load_file(output / FOLDER / f"step-{j}.safetensors")
        blocks = adapter.blocks(model)
        for orig in facts["changed_blocks"]:
            prefix = f"{orig}."
            blocks[original.index(orig)].load_state_dict(
                {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)})
        if original != facts["kept_blocks"]:
            raise UserError(f"{output}: step {j} does not replay to its recorded blocks; the steps are damaged")
        yield j, model, tokenizer


def rebuild(output, k: int):
    """(model, tokenizer) after k removals of the run that wrote `output`, bitwise as that run had it."""
    if k not in available(output):
        raise UserError(f"{output} keeps no step {k}; it has {available(output) or 'none'} "
                        "(compress with --keep-steps)")
    for j, model, tokenizer in replay(output, k):
        if j == k:
            return model, tokenizer
    raise AssertionError("unreachable")


def step_report(output, k: int) -> dict:
    """compression.json as the run would have written it had it stopped after k removals."""
    report = json.loads((Path(output) / "compression.json").read_text())
    facts = step_facts(output, k)
    n = report["blocks_before"]
    return {**report, "sparsity": k / n, "blocks_after": n - k, "removed_blocks": report["removed_blocks"][:k],
            "kept_blocks": facts["kept_blocks"], "iterations": report["iterations"][:k],
            "step_of": {"steps": len(available(output)), "k": k}}
