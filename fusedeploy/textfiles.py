"""Reading the text files users hand us (calibration text, task data, zero-shot items, YAML).

Every reader of a user's file fails the same way: one line that names the file (and the line
number, for JSON Lines) and says what to do, never a decoder traceback. Kept apart from the
readers so that the wording lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def read_bytes(path: Path, where: str) -> bytes:
    """The file's bytes; `where` names it in the error ("task data x.jsonl")."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{where}: cannot read it ({exc.strerror or exc})") from None


def decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; save it as UTF-8") from None


def read_utf8(path: Path, where: str) -> str:
    return decode_utf8(read_bytes(path, where), where)


def json_lines(text: str, where: str, example: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `example` shows an object the reader expects."""
    shape = f" such as {example}" if example else ""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{where}, line {lineno}: not valid JSON; each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}, line {lineno}: a JSON {type(record).__name__}, not an object; "
                            f"each line must be one JSON object{shape}")
        yield lineno, record
