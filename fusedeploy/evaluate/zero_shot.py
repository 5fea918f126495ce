"""Zero-shot retention: HellaSwag-style multiple choice on the dense and the deployed model, through lm-eval.

The user brings the data, a JSON Lines file in the format lm-eval's own HellaSwag task scores after
its preprocessing: one object per line with `query` (the context), `choices` (four endings) and
`label` (the index of the right ending). Nothing is shipped or downloaded.

A fixed subset is scored, not the whole file: its items are the first `n` of the file's items in
a seeded permutation (each line index ordered by sha256 of "seed:index"). The permutation needs no
random-number library, so the same file, seed and size pick the same items on any machine and
version; a larger `n` extends a smaller one's subset. Dense and compressed model score the same
subset, and each one's record carries a digest of the items lm-eval actually scored, so that can be
checked.

The default size bounds the standard error of an accuracy, sqrt(p (1 - p) / n), by 1.5 points at
its worst case p = 0.5: n = ceil(0.25 / 0.015^2) = 1112 items. Retention is compressed accuracy
over dense accuracy (acc_norm, length-normalised, the figure HellaSwag is quoted by); its standard
error is the paired delta-method one, since both models answer the same items.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..textfiles import json_lines, read_utf8

CHOICES = 4  # HellaSwag's endings per item
EXPECTED = f'{{"query": "...", "choices": [{CHOICES} endings], "label": 0-{CHOICES - 1}}}'
METRIC = "acc_norm"  # retention's metric: acc_norm (per-character length-normalised log-likelihood)
SE_TARGET = 0.015  # the largest standard error of an accuracy the default subset allows (1.5 points)
TASK = "fusedeploy_hellaswag"
SELECTION = "the first n items of the file in a seeded permutation: line indices ordered by sha256('<seed>:<index>')"


def standard_error(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n independent items: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def items_for_se(target: float = SE_TARGET, p: float = 0.5) -> int:
    """The fewest items whose accuracy's standard error at p is at most `target`."""
    return math.ceil(p * (1 - p) / target ** 2 - 1e-9)


DEFAULT_ITEMS = items_for_se()  # 1112: SE <= 1.5 points whatever the accuracy


def retention_se(dense: list[float], compressed: list[float]) -> float:
    """Standard error of mean(compressed) / mean(dense), both scored on the same items (delta method).

    With r the ratio and e_i = c_i - r d_i, Var(r) ~ Var(e) / (n mean(d)^2): the covariance of the two
    models' answers on shared items is in it (identical answers give 0).
    """
    n = len(dense)
    if n != len(compressed) or n == 0:
        raise ValueError("retention needs both models' scores on the same, non-empty set of items")
    d, c = sum(dense) / n, sum(compressed) / n
    if d == 0:
        return math.nan
    r = c / d
    e = [ci - r * di for ci, di in zip(compressed, dense)]
    mean_e = sum(e) / n
    return math.sqrt(sum((x - mean_e) ** 2 for x in e) / n / n) / d


# ---------------------------------------------------------------- the data and its subset


def load_items(path: str | Path) -> list[dict]:
    """The file's items, checked: one-line errors naming the line, before any model is loaded."""
    path = Path(path).expanduser()
    where = f"zero-shot data {path}"
    if not path.is_file():
        raise UserError(f"{where} not found" if not path.exists() else f"{where} is not a file; give a .jsonl file")
    items = [_item(record, f"{where}, line {lineno}")
             for lineno, record in json_lines(read_utf8(path, where), where, EXPECTED)]
    if not items:
        raise UserError(f"{where} is empty; give it HellaSwag items (one JSON object per line)")
    return items


def _item(record: dict, where: str) -> dict:
    query, choices, label = record.get("query"), record.get("choices"), record.get("label")
    if not isinstance(query, str) or not query.strip():
        raise UserError(f"{where}: no `query` text; each item is {EXPECTED}")
    if not (isinstance(choices, list) and len(choices) == CHOICES and all(isinstance(c, str) for c in choices)):
        raise UserError(f"{where}: `choices` must be a list of {CHOICES} strings; each item is {EXPECTED}")
    if isinstance(label, str) and label.isdigit():  # the Hub's HellaSwag keeps labels as strings
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < CHOICES:
        raise UserError(f"{where}: `label` must be the index of the right choice, 0-{CHOICES - 1}; got {label!r}")
    return {"query": query, "choices": choices, "label": label}


def subset_indices(available: int, n: int, seed: int) -> list[int]:
    """The first `n` (at most all) of `available` line indices in the seeded permutation."""
    order = sorted(range(available), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return order[:min(n, available)]


def items_digest(items: list[dict]) -> str:
    """sha256 over the items in order (query, choices, label): the same digest means the same items scored."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["query"], it["choices"], int(it["label"])], ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Subset:
    """What a build scores: the data file, how many items and the permutation's seed."""

    path: str
    items: int  # requested; fewer when the file holds fewer
    seed: int


def check_zero_shot(path: str | None, items: int | None, seed: int, default_items: int,
                    retention_budget: float | None = None, budget_flag: bool = False) -> Subset | None:
    """The subset a build will score, or one-line errors before any compute.

    `retention_budget` is the build's `min_zero_shot_retention` (from `--min-zero-shot-retention` when
    `budget_flag`, else from the profile): without data to measure it the build could only fail at
    its end, so it is refused here.
    """
    if path is None:
        if retention_budget is not None:
            given = "--min-zero-shot-retention" if budget_flag else "the profile's budgets.min_zero_shot_retention"
            raise UserError(f"{given} budgets zero-shot retention, but no zero-shot data is given to measure it; "
                            "add --zero-shot HELLASWAG.jsonl (query, four choices, label per line)")
        if items is not None:
            raise UserError("--zero-shot-items sets the size of the --zero-shot subset, but no --zero-shot data "
                            "is given")
        return None
    if items is not None and items < 1:
        raise UserError(f"--zero-shot-items must be at least 1 (got {items})")
    load_items(path)
    return Subset(str(path), items if items is not None else default_items, seed)


# ---------------------------------------------------------------- scoring


def _task_config(data_file: Path) -> dict:
    """lm-eval's HellaSwag task on already preprocessed items: context, then " " + each ending."""
    return {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}", "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _evaluate(lm, items: list[dict], model_args: dict | None = None) -> dict:
    """lm-eval on the items (an LM object, or a registered model's name with its `model_args`): per-item scores.

    Per item, in the order given: acc and acc_norm (0 or 1), each ending's log-likelihood, and the
    digest of the items lm-eval reports having scored (from its per-sample log).
    """
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .tasks import _offline

    with tempfile.TemporaryDirectory(prefix="fusedeploy-zeroshot-") as tmp, _offline():
        data = Path(tmp, "items.jsonl")
        data.write_text("".join(json.dumps({**it, "position": i}, ensure_ascii=False) + "\n"
                                for i, it in enumerate(items)), encoding="utf-8")
        include = Path(tmp, "tasks")
        include.mkdir()
        (include / f"{TASK}.yaml").write_text(yaml.safe_dump(_task_config(data)))
        manager = TaskManager(include_path=str(include), include_defaults=False)
        out = simple_evaluate(model=lm, model_args=model_args, tasks=[TASK], task_manager=manager, log_samples=True,
                              bootstrap_iters=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc"]["position"])
    scored = [{k: s["doc"][k] for k in ("query", "choices", "label")} for s in samples]
    return {"acc": [float(s["acc"]) for s in samples], "acc_norm": [float(s["acc_norm"]) for s in samples],
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "items_digest": items_digest(scored)}


def score(model, tokenizer, items: list[dict], batch_size: int = 8) -> dict:
    """The items scored on an in-memory Hugging Face model, through lm-eval's `hf` wrapper (see `_evaluate`)."""
    from lm_eval.models.huggingface import HFLM

    return _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), items)


SERVED_CONCURRENCY = 4  # lm-eval's concurrent requests, and the server's --parallel


def score_served(artifact, tokenizer_folder, items: list[dict], concurrency: int = SERVED_CONCURRENCY) -> dict:
    """The items scored on an exported artifact in its runtime: `fusedeploy serve` and lm-eval's `local-completions`.

    Both runtimes answer `/v1/completions` with `echo` and prompt log-probabilities (docs/serving.md,
    "Scoring with lm-eval through the server"); lm-eval sends token ids made by the artifact's Hugging
    Face tokenizer (`tokenizer_folder`: the checkpoint it was exported from).
    """
    import httpx

    from ..serve.load_step import served

    with served(artifact, parallel=concurrency) as url:
        model_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        return _evaluate("local-completions", items, {
            "base_url": f"{url}/v1/completions", "model": model_id, "tokenizer": str(tokenizer_folder),
            "tokenizer_backend": "huggingface", "num_concurrent": concurrency, "max_retries": 1})


def summary(per_item: dict) -> dict:
    """acc and acc_norm with their standard errors, from one model's per-item scores."""
    n = len(per_item["acc"])
    out = {"n": n}
    for metric in ("acc", "acc_norm"):
        p = sum(per_item[metric]) / n
        out[metric], out[f"{metric}_se"] = p, standard_error(p, n)
    out["items_digest"] = per_item["items_digest"]
    return out


def retention(dense: dict, compressed: dict) -> dict:
    """Compressed over dense accuracy (acc_norm, and acc beside it), with acc_norm's paired standard error."""
    d, c = sum(dense[METRIC]) / len(dense[METRIC]), sum(compressed[METRIC]) / len(compressed[METRIC])
    da, ca = sum(dense["acc"]), sum(compressed["acc"])
    return {"metric": METRIC, "retention": c / d if d else math.nan,  # NaN: fails a retention budget, with its reason
            "retention_se": retention_se(dense[METRIC], compressed[METRIC]),
            "retention_acc": ca / da if da else None}  # acc beside it, for reference; None where dense scored 0


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Scored:
    """One side of a comparison: how to score the chosen items, and what the record says was scored."""

    run: object  # Callable[[list[dict]], dict]: the items -> per-item scores (`_evaluate`'s dict)
    scored: str  # in words: "deployed artifact compressed-gguf-q4_k_m in llama.cpp", ...
    model: str  # its path
    runtime: str  # where it ran: "llama.cpp q4_k_m through fusedeploy serve", "pytorch (transformers) ..."


def compare(dense: Scored, compressed: Scored | None, subset: Subset) -> tuple[dict, dict]:
    """(summary, detail) of both sides on the subset; detail adds the subset's line indices and per-item scores.

    No compressed side (nothing removed): the dense scores stand for both, retention 1.
    """
    return compare_each(dense, [compressed], subset)[0]


def compare_each(dense: Scored, compressed: list[Scored | None], subset: Subset) -> list[tuple[dict, dict]]:
    """`compare` for several compressed models against one dense model, which is scored once."""
    from importlib import metadata

    path = Path(subset.path).expanduser()
    items = load_items(path)
    indices = subset_indices(len(items), subset.items, subset.seed)
    chosen = [items[i] for i in indices]
    t0 = time.perf_counter()
    d = dense.run(chosen)
    dense_s = time.perf_counter() - t0
    common = {
        "task": f"HellaSwag-style multiple choice ({CHOICES} endings), lm-eval {metadata.version('lm_eval')}",
        "data": {"path": str(path.resolve()), "sha256": _file_sha256(path), "items_in_file": len(items)},
        "subset": {"n": len(indices), "requested": subset.items, "seed": subset.seed, "selection": SELECTION,
                   "items_digest": items_digest(chosen)},
    }
    dense_side = {**summary(d), "scored": dense.scored, "model": dense.model, "runtime": dense.runtime,
                  "score_s": round(dense_s, 1)}
    out = []
    for side in compressed:
        t0 = time.perf_counter()
        c = side.run(chosen) if side is not None else d
        c_s = time.perf_counter() - t0 if side is not None else dense_s
        about = ({"scored": side.scored, "model": side.model, "runtime": side.runtime} if side is not None else
                 {"scored": f"{dense.scored} (nothing was removed: scored once for both)", "model": dense.model,
                  "runtime": dense.runtime})
        result = {**common, **retention(d, c), "dense": dense_side,
                  "compressed": {**summary(c), **about, "score_s": round(c_s, 1)}, "se_target": SE_TARGET}
        result["se_target_met"] = max(result["dense"][f"{METRIC}_se"], result["compressed"][f"{METRIC}_se"]) <= SE_TARGET
        detail = {**result, "indices": indices,
                  "per_item": {name: {m: r[m] for m in ("acc", "acc_norm", "loglikelihoods")}
                               for name, r in (("dense", d), ("compressed", c))}}
        out.append((result, detail))
    return out


def pytorch_side(spec, scored: str, device: str = "cpu", dtype: str = "float32", batch_size: int = 8) -> Scored:
    """A PyTorch checkpoint (a folder, a built-in name, ...) scored through lm-eval's `hf` wrapper."""
    from ..models.loading import load_model

    def run(items: list[dict]) -> dict:
        model, tokenizer, _ = load_model(str(spec), device=device, dtype=dtype)
        return score(model.eval(), tokenizer, items, batch_size)

    return Scored(run, scored, str(spec), f"pytorch (transformers), {dtype} on {device}")


def artifact_side(artifact, name: str, scored: str, tokenizer_of) -> Scored:
    """An exported artifact (formats.Artifact) scored in its runtime through `fusedeploy serve`.

    `tokenizer_of`: the model whose tokenizer lm-eval uses (the checkpoint the artifact was exported
    from; a folder, GGUF file or built-in name); it is saved as a Hugging Face tokenizer folder first.
    """
    from ..models.loading import load_tokenizer, resolve_model, save_tokenizer

    def run(items: list[dict]) -> dict:
        with tempfile.TemporaryDirectory(prefix="fusedeploy-tokenizer-") as folder:
            save_tokenizer(load_tokenizer(resolve_model(str(tokenizer_of))), folder)
            return score_served(artifact.path, folder, items)

    return Scored(run, f"{scored} {name} in {artifact.runtime}", str(artifact.path),
                  f"{artifact.runtime} {artifact.precision}, through fusedeploy serve (lm-eval local-completions)")


def compare_zero_shot(dense_model, compressed_models: list, subset: Subset, device: str = "cpu",
                      dtype: str = "float32", batch_size: int = 8) -> list[tuple[dict, dict]]:
    """PyTorch checkpoints on the subset (`compare_each`): the dense model once, then each compressed one
    (None: nothing removed)."""
    kw = dict(device=device, dtype=dtype, batch_size=batch_size)
    return compare_each(pytorch_side(dense_model, "dense pytorch checkpoint", **kw),
                        [None if m is None else pytorch_side(m, "compressed pytorch checkpoint", **kw)
                         for m in compressed_models], subset)
