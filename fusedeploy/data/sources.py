"""Text sources: local files and folders, JSON Lines, Hugging Face datasets, and a built-in corpus.

The built-in source is the help-topic text that ships with CPython
(`pydoc_data.topics`, ~0.5 MB of English technical prose), so the default
path needs no network and this repository carries no copied text.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..hub import hub_reachable, offline_requested
from ..textfiles import json_lines, read_utf8

BUILTIN = "builtin"
# short name -> (datasets path, config, text field, split for calibration, split for evaluation, revision).
# datasets >= 4 runs no loading scripts: PTB's repository is a script, so it is read from the Parquet
# copy the Hub keeps of it (`refs/convert/parquet`).
HF_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "train", "test", None),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", "train", "test", "refs/convert/parquet"),
    "c4": ("allenai/c4", "en", "text", "train", "validation", None),
}


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_jsonl(path: Path, field: str) -> str:
    """One JSON object per line, the text under `field`. Messages name no flag: several commands read JSONL."""
    parts = []
    for lineno, record in json_lines(read_utf8(path, str(path)), str(path), f'{{"{field}": "..."}}'):
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:5])) or "none"
            raise UserError(f"{path}, line {lineno}: no field {field!r} (its fields: {keys}); "
                            f"put each line's text under {field!r}")
        parts.append(str(record[field]))
    return "\n\n".join(parts)


def _load_hf_dataset(name: str, purpose: str) -> str:
    path, config, field, calib_split, eval_split, revision = HF_DATASETS[name]
    split = eval_split if purpose == "eval" else calib_split
    if not offline_requested() and not hub_reachable():
        raise UserError(f"cannot load dataset {name!r}: the Hugging Face Hub is unreachable (offline?); "
                        "pass a local .txt file or 'builtin'")
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split, revision=revision)
    except Exception as exc:  # datasets raises many types when offline
        raise UserError(
            f"cannot load dataset {name!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "offline? pass a local .txt file or 'builtin'"
        ) from None
    if name == "c4":  # C4 is huge; the FuseGPT protocol uses a small slice
        ds = ds.select(range(min(len(ds), 5000)))
    return "\n\n".join(ds[field])


def load_text(spec: str, purpose: str = "eval", text_field: str = "text") -> str:
    """Read a text source named by the user. `purpose` picks a dataset split: calib or eval."""
    if spec == BUILTIN:
        return builtin_text()
    if spec in HF_DATASETS:
        return _load_hf_dataset(spec, purpose)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {spec} holds no .txt files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        return path.read_text(encoding="utf-8", errors="replace")
    names = ", ".join([BUILTIN, *HF_DATASETS])
    raise UserError(f"text source not found: {spec!r} (give a .txt/.jsonl file, a folder, or one of: {names})")
