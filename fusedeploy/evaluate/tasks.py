"""Zero-shot task accuracy through lm-evaluation-harness, on local task files only.

A task is lm-eval's own YAML (for example `output_type: multiple_choice` with `dataset_path: json`
and `dataset_kwargs.data_files` naming a local .jsonl). FuseDeploy adds what a deployment check
needs around it: data paths relative to the YAML file work, nothing is fetched from the Hub
(the datasets library runs offline), and a missing or malformed task is one line, not a traceback.
The model is the in-memory Hugging Face model, through lm-eval's own HF wrapper.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import yaml

from ..errors import UserError
from ..textfiles import decode_utf8, json_lines, read_bytes


def _task_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if files:
            return files
        raise UserError(f"no task .yaml file in {path}")
    raise UserError(f"task file not found: {path}")


def _resolved(path: Path) -> dict:
    """The task's YAML with its local data files made absolute; one-line errors for what lm-eval would crash on."""
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read task file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise UserError(f"{path}: not an lm-eval task (a YAML mapping with a `task:` name is expected)")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("dataset_path") not in ("json", "csv", "text", "parquet") or not files:
        raise UserError(f"{path}: task {cfg['task']!r} must read local data (dataset_path: json|csv|text|parquet "
                        "with dataset_kwargs.data_files); nothing is downloaded")
    items = files.items() if isinstance(files, dict) else [("test", files)]
    fixed = {}
    for split, f in items:
        full = (path.parent / f).resolve() if not Path(f).is_absolute() else Path(f)
        if not full.is_file():
            raise UserError(f"{path}: data file {f} of task {cfg['task']!r} not found (looked at {full})")
        _check_data_file(path, cfg["task"], cfg["dataset_path"], full)
        fixed[split] = str(full)
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": fixed}
    return cfg


def _check_data_file(task_file: Path, task: str, kind: str, data: Path) -> None:
    """A task's data file holds at least one record of its format; else lm-eval would fail after the build's work.

    JSON: JSON Lines (one object per line) or one JSON document; CSV: a header and a row; text: a
    line; Parquet: the format's magic bytes.
    """
    where = f"{task_file}: data file {data.name} of task {task!r}"
    raw = read_bytes(data, where)
    if kind == "parquet":
        if not (raw.startswith(b"PAR1") and raw.endswith(b"PAR1")):
            raise UserError(f"{where} is not a Parquet file; give one with the task's records")
        return
    text = decode_utf8(raw, where)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{where} is empty; give it the task's records")
    if kind == "csv" and len(lines) < 2:
        raise UserError(f"{where} has a header but no rows; give it the task's records")
    if kind == "json":
        import json

        try:
            json.loads(text)  # one JSON document (a list of records, or records under a field)
            return
        except ValueError:
            pass
        for _ in json_lines(text, where):
            pass


@contextlib.contextmanager
def _offline():
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_accuracy(model, tokenizer, tasks: str | Path, limit: int | None = None, batch_size: int = 8) -> dict:
    """{task: {"acc": ..., "acc_norm": ..., "n": ...}} for every task file at `tasks` (a file or a folder)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    configs = [_resolved(p) for p in _task_files(Path(tasks))]
    with tempfile.TemporaryDirectory(prefix="fusedeploy-tasks-") as include, _offline():
        for cfg in configs:
            Path(include, cfg["task"] + ".yaml").write_text(yaml.safe_dump(cfg))
        manager = TaskManager(include_path=include, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=[c["task"] for c in configs], task_manager=manager, limit=limit,
                              log_samples=False)
    results = {}
    for cfg in configs:
        r = out["results"][cfg["task"]]
        results[cfg["task"]] = {metric.split(",")[0]: v for metric, v in r.items()
                                if "," in metric and "stderr" not in metric and isinstance(v, (int, float))}
        results[cfg["task"]]["n"] = out.get("n-samples", {}).get(cfg["task"], {}).get("effective")
    return results


def check_tasks(tasks: str | Path | None, accuracy_budget: float | None = None,
                budget_flag: bool = False) -> list[str]:
    """The task names at `tasks`, or one-line errors for a missing or malformed file, before any compute.

    `accuracy_budget` is the build's `max_accuracy_drop` (from `--max-accuracy-drop` when
    `budget_flag`, else from the profile): with no tasks to measure it the build could only fail
    at its end, so it is refused here.
    """
    if tasks is None:
        if accuracy_budget is not None:
            given = "--max-accuracy-drop" if budget_flag else "the profile's budgets.max_accuracy_drop"
            raise UserError(f"{given} budgets task accuracy, but no tasks are given to measure it; "
                            "add --eval-tasks TASK.yaml (lm-eval tasks on local data)")
        return []
    return [_resolved(p)["task"] for p in _task_files(Path(tasks))]


def compare_models(dense_model, compressed_model, tasks: str | Path, limit: int | None = None) -> dict:
    """Accuracy of the dense and the compressed model per task, and the drop (dense - compressed).

    The metric is `acc_norm` where the task reports it (length-normalised multiple choice, the figure
    HellaSwag is usually quoted by), else `acc`. No compressed model (nothing removed): a drop of 0.
    """
    from ..models.loading import load_model

    def run(spec):
        model, tokenizer, _ = load_model(str(spec), device="cpu", dtype="float32")
        return task_accuracy(model.eval(), tokenizer, tasks, limit=limit)

    dense = run(dense_model)
    compressed = run(compressed_model) if compressed_model is not None else dense
    out = {}
    for task, d in dense.items():
        metric = "acc_norm" if "acc_norm" in d else "acc"
        c = compressed[task]
        out[task] = {"metric": metric, "dense": d[metric], "compressed": c[metric], "drop": d[metric] - c[metric],
                     "n": d.get("n"), "dense_all": d, "compressed_all": c}
    return out
