"""A newcomer's check of the documentation: every command and flag it shows exists.

README.md, BENCHMARKS.md and docs/*.md are read for `fusedeploy <command> ...` invocations: each line of a code
block (a trailing backslash continues it), each inline code span in prose, and, in prose, the
bare `--flag` spans and `command --flag` spans around them. Each command must be one the CLI has,
and each flag must appear in that command's `--help`. The ONNX precisions `export onnx --help`
lists must be the catalogue's rows, and the Makefile targets the README names must exist.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from fusedeploy import formats
from fusedeploy.cli import app

from .conftest import REPO

DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
GROUPS = {"export": ("gguf", "onnx"), "profiles": ("list", "show", "plan")}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# `fusedeploy` as a command word: not part of a path (fusedeploy/formats.py), a module (fusedeploy.cli)
# or an extra (fusedeploy[optimum]); `.venv/bin/fusedeploy` and `-m fusedeploy` count.
COMMAND_WORD = re.compile(r"(?:^|(?<=[\s/`(]))fusedeploy(?=\s|$)")
SHELL_BREAKS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


# ---------------------------------------------------------------- what --help says


@functools.lru_cache(maxsize=None)
def help_text(path: tuple[str, ...]) -> str | None:
    """`fusedeploy <path> --help` on one line per option, or None when the command does not exist."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    if result.exit_code != 0:
        return None
    return result.output


@functools.lru_cache(maxsize=None)
def flags_of(path: tuple[str, ...]) -> frozenset[str]:
    text = help_text(path)
    return frozenset(FLAG.findall(text)) if text else frozenset()


def commands() -> set[tuple[str, ...]]:
    """Every command path the CLI has, from the root's and the groups' --help."""
    found = set()
    for name in re.findall(r"│\s+([a-z][a-z-]*)\s{2,}", _section(help_text(()), "Commands")):
        subs = GROUPS.get(name)
        found.update({(name, s) for s in subs} if subs else {(name,)})
    return found


def _section(text: str, title: str) -> str:
    return text.split(f"─ {title} ", 1)[1] if f"─ {title} " in text else ""


# ---------------------------------------------------------------- what the docs say


@dataclass(frozen=True)
class Use:
    where: str  # file:line
    command: tuple[str, ...]  # () = only global options; ("?", word) = a command that does not exist
    flags: tuple[str, ...]
    text: str


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a synopsis: split on blanks
        return text.split()


def parse_invocation(text: str, where: str) -> list[Use]:
    """The `fusedeploy ...` invocations in one logical line of code or one code span."""
    uses = []
    for match in COMMAND_WORD.finditer(text):
        tokens = _tokens(text[match.end():])
        global_flags, i = [], 0
        while i < len(tokens) and tokens[i].startswith("-"):
            global_flags.append(tokens[i])
            i += 1
        path: tuple[str, ...] = ()
        if i < len(tokens) and re.fullmatch(r"[a-z][a-z-]*", tokens[i]):
            path = (tokens[i],)
            i += 1
            if path[0] in GROUPS and i < len(tokens) and re.fullmatch(r"[a-z]+", tokens[i]):
                path += (tokens[i],)
                i += 1
        if global_flags:
            uses.append(Use(where, (), tuple(f for t in global_flags for f in FLAG.findall(t)), text))
        if not path:
            continue
        flags = []
        for token in tokens[i:]:
            if token in SHELL_BREAKS or COMMAND_WORD.search(token):
                break
            flags.extend(FLAG.findall(token))
        uses.append(Use(where, path, tuple(flags), text))
    return uses


def _command_span(span: str) -> tuple[str, ...] | None:
    """`build --serve-load`, `export gguf --imatrix-data`: a command path and a flag, no `fusedeploy`."""
    words = span.split()
    if not words or words[0] not in {c[0] for c in commands()}:
        return None
    path = (words[0],)
    if words[0] in GROUPS and len(words) > 1 and words[1] in GROUPS[words[0]]:
        path += (words[1],)
    rest = " ".join(words[len(path):])
    return path if FLAG.search(rest) else None


def parse_markdown(text: str, name: str) -> list[Use]:
    """Every invocation and flag use in a Markdown text."""
    uses: list[Use] = []
    lines = text.splitlines()
    in_code, logical, start = False, "", 0
    block: list[tuple[int, str]] = []  # a prose paragraph, list item or table row: (line number, text)

    def flush_prose() -> None:
        if block:
            uses.extend(_prose_uses(" ".join(t for _, t in block), f"{name}:{block[0][0]}"))
            block.clear()

    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            flush_prose()
            in_code = not in_code
            continue
        if in_code:
            if not logical:
                start = number
            logical += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                uses.extend(parse_invocation(logical, f"{name}:{start}"))
                logical = ""
            continue
        if not line.strip() or line.lstrip().startswith(("- ", "* ", "|", "#")) or re.match(r"\s*\d+\. ", line):
            flush_prose()
        if line.strip():
            block.append((number, line.strip()))
            if line.lstrip().startswith(("|", "#")):
                flush_prose()
    flush_prose()
    return uses


def _prose_uses(paragraph: str, where: str) -> list[Use]:
    uses: list[Use] = []
    current: tuple[str, ...] | None = None
    for span in re.findall(r"`([^`]+)`", paragraph):
        found = parse_invocation(span, where)
        if found:
            uses.extend(found)
            current = found[-1].command or current
            continue
        path = _command_span(span)
        if path:
            uses.append(Use(where, path, tuple(FLAG.findall(span)), span))
            current = path
        elif span.startswith("--"):
            # a bare flag belongs to the command the paragraph last named; with none, to some command
            uses.append(Use(where, current if current else ("*",), tuple(FLAG.findall(span.split()[0])), span))
    return uses


def problems(uses: list[Use]) -> list[str]:
    """What a newcomer would trip over: a command the CLI lacks, a flag its --help does not list."""
    known = commands()
    everywhere = frozenset().union(*(flags_of(c) for c in known), flags_of(()))
    found = []
    for use in uses:
        if use.command == ("*",):
            missing = [f for f in use.flags if f not in everywhere]
        elif use.command and use.command not in known:
            found.append(f"{use.where}: no command `fusedeploy {' '.join(use.command)}` ({use.text.strip()})")
            continue
        else:
            missing = [f for f in use.flags if f not in flags_of(use.command)]
        for flag in missing:
            if use.command == ("*",):
                found.append(f"{use.where}: {flag} is in no command's --help ({use.text.strip()})")
            else:
                shown = " ".join(("fusedeploy", *use.command))
                found.append(f"{use.where}: {flag} is not in `{shown} --help` ({use.text.strip()})")
    return found


# ---------------------------------------------------------------- the tests


def test_the_help_is_read_whole():
    """Wide enough that rich never wraps an option: every option of a few commands is seen."""
    assert {("build",), ("compress",), ("export", "gguf"), ("export", "onnx"), ("profiles", "plan"), ("serve",),
            ("bench-serve",), ("info",), ("eval",), ("verify",)} <= commands()
    assert {"--serve-load", "--no-serve-load", "--max-accuracy-drop", "--eval-tasks"} <= flags_of(("build",))
    assert {"--precision", "--quantize", "--accuracy-level", "--block-size"} <= flags_of(("export", "onnx"))
    assert {"--trust-remote-code", "--debug", "--version"} <= flags_of(())


def test_the_parser_catches_what_a_newcomer_would_trip_over():
    text = """
Run `fusedeploy build --profile edge-8gb --no-such-flag` first, then `--bogus-option`.

```bash
fusedeploy export onnx --model m --out o \\
    --precision int4 --made-up
fusedeploy frobnicate --model m
fusedeploy --not-global info m
fusedeploy serve m.gguf --port 8000 | grep --only-grep-has-this
```

Also `compress --set x=1 --imaginary` and `export gguf --type f16`.
"""
    uses = parse_markdown(text, "sample.md")
    assert ("export", "onnx") in {u.command for u in uses}
    found = problems(uses)
    for expected in ("--no-such-flag is not in `fusedeploy build --help`",
                     "--bogus-option is not in `fusedeploy build --help`",  # a bare span: the paragraph's command
                     "--made-up is not in `fusedeploy export onnx --help`",  # after a continued line
                     "no command `fusedeploy frobnicate`",
                     "--not-global is not in `fusedeploy --help`",
                     "--imaginary is not in `fusedeploy compress --help`"):
        assert any(expected in p for p in found), (expected, found)
    assert not any("--only-grep-has-this" in p or "--type" in p or "--port" in p for p in found), found
    assert len(found) == 6, found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_command_and_flag_the_docs_show_exists(doc):
    uses = parse_markdown(doc.read_text(encoding="utf-8"), str(doc.relative_to(REPO)))
    assert not problems(uses), "\n".join(problems(uses))


def test_the_readme_shows_the_main_commands():
    uses = parse_markdown((REPO / "README.md").read_text(encoding="utf-8"), "README.md")
    shown = {u.command for u in uses}
    assert {("build",), ("compress",), ("export", "gguf"), ("export", "onnx"), ("verify",), ("serve",),
            ("bench-serve",), ("profiles", "plan"), ("info",), ("eval",)} <= shown


def test_a_flag_planted_in_the_readme_is_caught():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = next(l for l in readme.splitlines() if l.startswith("fusedeploy export gguf "))
    planted = readme.replace(line, line.replace("--type", "--kind"), 1)
    found = problems(parse_markdown(planted, "README.md"))
    assert len(found) == 1 and "--kind is not in `fusedeploy export gguf --help`" in found[0], found
    prose = readme.replace("`--revision`", "`--revisions`", 1)
    assert prose != readme
    assert any("--revisions" in p for p in problems(parse_markdown(prose, "README.md")))


def test_onnx_precisions_in_help_are_the_catalogue_rows():
    text = " ".join(help_text(("export", "onnx")).split())
    listed = text.split("--precision", 1)[1].split("(default", 1)[0]
    names = re.findall(r"\b(fp32|fp16|bf16|int8|int4|[a-z]+\d+[a-z0-9_]*)\b", listed)
    rows = formats.PRECISIONS[formats.ONNXRUNTIME.name]
    assert names and set(names) <= set(rows), (names, list(rows))
    assert set(rows) <= set(names), f"rows missing from --help: {set(rows) - set(names)}"
    assert formats.precision_help(formats.ONNXRUNTIME.name) in text
    for name, row in rows.items():  # a precision that does not run everywhere says where it runs
        if set(row.devices) != {"cpu", "cuda"}:
            assert f"{name} ({'/'.join(row.devices)} only)" in text


def test_the_make_targets_the_readme_names_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", readme, flags=re.M))
    assert {"run", "test"} <= named
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    assert named <= targets, named - targets
