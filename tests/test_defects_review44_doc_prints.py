"""What the docs say a runnable block prints is what it prints.

tests/test_docs.py runs the `<!-- runnable -->` blocks and their asserts, but the
``prints`` block a page shows after one (README.md's three lines, quickstart.md's
decision summary) was never compared: quickstart.md showed the retry's entry as
`retry/retry/status_503@memory+...ms` ("the retry's `+...ms` is the age of the state it
was decided on") after the retry had stopped counting its backoff as a state age
(63d3cd0); it prints `retry/retry/status_503@memory`.

A python block followed by a paragraph starting with "prints" and a code fence: the
block's standard output must equal the fence's lines (`...` in a line matches any
text, a line of just `...` any number of lines, as in the console blocks).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import test_docs
from test_docs import DOCS, FENCE, ROOT, _id, _lines_match, run_document, runnable_blocks


def printed_blocks(doc: Path) -> dict[int, list[str]]:
    """Opening-fence line of a runnable python block -> the lines the page says it prints."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: dict[int, list[str]] = {}
    for block in runnable_blocks(doc):
        if block.lang != "python":
            continue
        k = block.line  # 1-based line of the opening fence
        fence = FENCE.match(lines[k - 1])
        assert fence is not None
        k += 1 + block.code.count("\n")  # the closing fence's 1-based line
        rest = lines[k:]
        prose = next((i for i, line in enumerate(rest) if line.strip()), None)
        if prose is None or not re.match(r"prints\b", rest[prose]):
            continue
        start = next(i for i in range(prose, len(rest)) if FENCE.match(rest[i]))
        end = next(i for i in range(start + 1, len(rest)) if rest[i].startswith("```"))
        out[block.line] = rest[start + 1 : end]
    return out


WITH_PRINTS = [doc for doc in DOCS if printed_blocks(doc)]


def test_the_pages_that_show_output_are_found() -> None:
    names = {_id(doc) for doc in WITH_PRINTS}
    assert {"README.md", "docs/quickstart.md"} <= names


@pytest.mark.parametrize("doc", WITH_PRINTS, ids=_id)
def test_a_block_prints_what_the_page_says(
    doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    expected = printed_blocks(doc)
    printed: dict[int, str] = {}
    original = test_docs.exec_block

    def capturing(code: object, namespace: dict[str, object]) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            original(code, namespace)
        printed[int(str(getattr(code, "co_filename", ":0")).rsplit(":", 1)[1])] = out.getvalue()

    monkeypatch.setattr(test_docs, "exec_block", capturing)
    run_document(doc, tmp_path)
    for line, lines in expected.items():
        got = printed.get(line, "").rstrip("\n").splitlines()
        assert _lines_match(got, lines), (
            f"{_id(doc)}:{line} prints\n" + "\n".join(got) + "\nthe page shows\n" + "\n".join(lines)
        )
