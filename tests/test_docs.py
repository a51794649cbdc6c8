"""Docs that run: README.md and docs/*.md are executed and compared, not just read.

Two markers, both HTML comments (invisible when the Markdown is rendered):

``<!-- runnable -->`` on the line right before a fenced code block runs it.
Blocks of one document run in order, in one fresh temporary directory, and
Python blocks share one namespace (like a notebook):

- ```` ```python ````: executed; an exception fails the test;
- ```` ```toml ````: must be a valid policy (`Policy.from_dict`);
- ```` ```console ````: lines starting with ``$ fidelity-mw`` are run in-process
  (`cli.main`) and the lines after them, up to the next ``$``, must equal the
  output (``...`` in an expected line matches any text, a line of just
  ``...`` any number of lines); ``$ echo $?`` prints the previous exit code.

Options, space-separated after ``runnable:``: ``file=NAME`` writes the block to
NAME in the document's directory instead of running or validating it (a later
block uses it), ``cwd=repo`` runs a block from the repository root.

``<!-- generated: COMMAND -->`` ... ``<!-- end generated -->`` must hold the
current output of COMMAND (run from the repository root), optionally inside a
code fence. COMMAND is ``fidelity-mw ARGS`` or ``python module:function``
(a function returning the text). After a change, refresh every generated
section with::

    .venv/bin/python tests/test_docs.py --update
"""

from __future__ import annotations

import contextlib
import importlib
import io
import linecache
import logging
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
MY_DOCS = ("quickstart", "policy", "migration", "map-example", "audit-example")

RUNNABLE = re.compile(r"^<!--\s*runnable(?::\s*(?P<opts>.*?))?\s*-->\s*$")
GENERATED = re.compile(r"^<!--\s*generated:\s*(?P<cmd>.+?)\s*-->\s*$")
END_GENERATED = re.compile(r"^<!--\s*end generated\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
OPTIONS = {"file", "cwd"}


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class Generated:
    doc: Path
    line: int
    command: str
    start: int  # index of the first content line
    end: int  # index of the end marker
    content: str


def _parse_options(text: str | None, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in (text or "").split():
        key, _, value = item.partition("=")
        if key not in OPTIONS or not value:
            raise ValueError(f"{where}: unknown runnable option {item!r} (known: {OPTIONS})")
        options[key] = value
    return options


def runnable_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = RUNNABLE.match(lines[i])
        if not m:
            i += 1
            continue
        where = f"{_rel(doc)}:{i + 1}"
        options = _parse_options(m.group("opts"), where)
        j = i + 1
        fence = FENCE.match(lines[j]) if j < len(lines) else None
        if fence is None:
            raise ValueError(f"{where}: a runnable marker must sit right above a code fence")
        body: list[str] = []
        k = j + 1
        while k < len(lines) and not lines[k].startswith(fence.group("fence")):
            body.append(lines[k])
            k += 1
        if k == len(lines):
            raise ValueError(f"{where}: the code fence is never closed")
        blocks.append(Block(doc, j + 1, fence.group("lang"), "\n".join(body) + "\n", options))
        i = k + 1
    return blocks


def generated_sections(doc: Path) -> list[Generated]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    found: list[Generated] = []
    for i, line in enumerate(lines):
        m = GENERATED.match(line)
        if not m:
            continue
        end = next((k for k in range(i + 1, len(lines)) if END_GENERATED.match(lines[k])), None)
        if end is None:
            raise ValueError(f"{_rel(doc)}:{i + 1}: no <!-- end generated -->")
        found.append(
            Generated(doc, i + 1, m.group("cmd"), i + 1, end, "\n".join(lines[i + 1 : end]))
        )
    return found


# ---------------------------------------------------------------- running


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli(args: list[str]) -> tuple[int, str]:
    from fidelity_mw.tools.cli import main

    out = io.StringIO()
    # the library's once-per-process log warnings (the imported app's transports) are
    # not the command's output: whether they show depends on what ran before
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(args)
    finally:
        logging.disable(logging.NOTSET)
    return code, out.getvalue()


def run_command(command: str) -> str:
    """The output of a generated section's command, run from the repository root."""
    if command.startswith("python "):
        module, _, func = command.removeprefix("python ").strip().partition(":")
        fn: Callable[[], str] = getattr(importlib.import_module(module), func)
        with working_directory(ROOT):
            return fn()
    argv = shlex.split(command)
    if argv[0] != "fidelity-mw":
        raise ValueError(f"generated command must be `fidelity-mw ...` or `python m:f`: {command}")
    with working_directory(ROOT):
        _, output = run_cli(argv[1:])
    return output


def _strip_fence(text: str) -> str:
    lines = text.strip("\n").splitlines()
    if len(lines) >= 2 and FENCE.match(lines[0]) and lines[-1].strip().startswith("```"):
        lines = lines[1:-1]
    return "\n".join(lines)


def check_console(block: Block) -> None:
    lines = block.code.splitlines()
    last = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            raise AssertionError(f"{block.where}: output line without a command: {line!r}")
        expected: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        argv = shlex.split(line[2:])
        if argv == ["echo", "$?"]:
            output = f"{last}\n"
        elif argv and argv[0] == "fidelity-mw":
            last, output = run_cli(argv[1:])
        else:
            raise AssertionError(f"{block.where}: only `fidelity-mw` and `echo $?` run: {line!r}")
        got = output.rstrip("\n").splitlines()
        assert _lines_match(got, expected), f"{block.where}: output of {line!r} differs:\n{output}"


def _lines_match(got: list[str], expected: list[str]) -> bool:
    """Line by line; a line that is only `...` stands for any number of lines."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(_lines_match(got[i:], expected[1:]) for i in range(len(got) + 1))
    return bool(got) and _line_matches(got[0], expected[0]) and _lines_match(got[1:], expected[1:])


def _line_matches(got: str, expected: str) -> bool:
    """Exact, except that `...` in the expected line matches any text."""
    if "..." not in expected:
        return got == expected
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got) is not None


def exec_block(code: object, namespace: dict[str, object]) -> None:
    """Runs one python block (a seam: tests/test_defects_review44_doc_prints.py reads
    what a block prints through it)."""
    exec(code, namespace)  # type: ignore[call-overload]


def run_document(doc: Path, tmp: Path) -> int:
    """Run every runnable block of `doc` in order; returns how many ran."""
    from fidelity_mw import Policy

    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for block in runnable_blocks(doc):
        cwd = ROOT if block.options.get("cwd") == "repo" else tmp
        with working_directory(cwd):
            if block.lang == "toml" and "file" not in block.options:
                try:
                    Policy.from_dict(tomllib.loads(block.code))
                except Exception as exc:
                    raise AssertionError(f"{block.where}: invalid policy: {exc}") from exc
            if "file" in block.options:
                (tmp / block.options["file"]).write_text(block.code, encoding="utf-8")
            elif block.lang == "python":
                code = compile(block.code, block.where, "exec")
                # so that a failing block's traceback shows its source lines
                lines = block.code.splitlines(keepends=True)
                linecache.cache[block.where] = (len(block.code), None, lines, block.where)
                exec_block(code, namespace)
            elif block.lang == "console":
                check_console(block)
            elif block.lang != "toml":
                raise AssertionError(f"{block.where}: cannot run a {block.lang!r} block")
        ran += 1
    return ran


# ---------------------------------------------------------------- tests


def _id(path: Path) -> str:
    return _rel(path)


def test_my_docs_exist():
    names = {p.stem for p in DOCS}
    assert set(MY_DOCS) <= names


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_runnable_blocks(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    run_document(doc, tmp_path)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_generated_sections_are_current(doc: Path):
    for section in generated_sections(doc):
        expected = run_command(section.command).strip("\n")
        got = _strip_fence(section.content)
        assert got == expected, (
            f"{_id(doc)}:{section.line}: the output of `{section.command}` changed; "
            "run `.venv/bin/python tests/test_docs.py --update`"
        )


def test_docs_run_code():
    """The marker convention is in use: a typo in a marker must not silently skip docs."""
    counts = {p.stem: len(runnable_blocks(p)) for p in DOCS}
    assert counts["quickstart"] >= 4
    assert counts["migration"] >= 8
    assert counts["policy"] >= 2
    assert counts["audit-example"] >= 1
    generated = {p.stem: len(generated_sections(p)) for p in DOCS}
    assert generated["policy"] == 1
    assert generated["map-example"] >= 2
    assert generated["audit-example"] >= 1


def test_every_policy_key_is_documented():
    from fidelity_mw.policy.reference import key_docs

    documented = {doc.path for doc in key_docs()}
    # spot-check the generator against the dataclasses, one field per section
    for path in (
        "version",
        "state.url",
        "deadline.header",
        "rate_limit.burst",
        "breaker.half_open_probes",
        "route.deadline_ms",
        "upstream.attempt_timeout_ms",
        "upstream.retry.budget_ratio",
    ):
        assert path in documented
    policy_md = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    for doc in key_docs():
        assert f"| `{doc.key}` |" in policy_md, doc.path


def test_harness_rejects_bad_markers(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- runnable: flie=x -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unknown runnable option"):
        runnable_blocks(doc)
    doc.write_text("<!-- runnable -->\n\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="right above a code fence"):
        runnable_blocks(doc)


def test_console_blocks_compare_output(tmp_path: Path):
    block = Block(ROOT / "README.md", 1, "console", "$ fidelity-mw check\n$ echo $?\n2\n")
    with pytest.raises(AssertionError, match="output of '\\$ fidelity-mw check' differs"):
        check_console(block)


# ---------------------------------------------------------------- --update


def update() -> None:
    for doc in DOCS:
        sections = generated_sections(doc)
        if not sections:
            continue
        lines = doc.read_text(encoding="utf-8").splitlines()
        for section in reversed(sections):
            body = run_command(section.command).strip("\n")
            old = section.content.strip("\n").splitlines()
            if old and FENCE.match(old[0]):
                body = f"{old[0]}\n{body}\n```"
            lines[section.start : section.end] = ["", *body.splitlines(), ""]
        doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"updated {_id(doc)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update")
    sys.path.insert(0, str(ROOT / "src"))
    update()
