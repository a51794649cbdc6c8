"""Path and host globs: exact semantics, and no backtracking (issue 12 #6)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw.policy import glob_matches


def _reference(pattern: str, text: str) -> bool:
    """Obviously correct (and exponential without the cache): the definition itself."""

    @functools.cache
    def match(p: int, t: int) -> bool:
        if p == len(pattern):
            return t == len(text)
        if pattern[p] == "*":
            return match(p + 1, t) or (t < len(text) and match(p, t + 1))
        if t < len(text) and pattern[p] in ("?", text[t]):
            return match(p + 1, t + 1)
        return False

    return match(0, 0)


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("/api/*", "/api/x/y", True),
        ("/api/*", "/api", False),
        ("/api/*/items/*/raw", "/api/a/items/b/raw", True),
        ("/api/*/items/*/raw", "/api/a/items/b/raw/", False),
        ("/api/*/items/*/raw", "/api/items/raw", False),
        ("/a?c", "/abc", True),
        ("/a?c", "/ac", False),
        ("*.example.com", "a.b.example.com", True),
        ("a*a", "a", False),  # head and tail must not overlap
        ("a*a", "aa", True),
        ("**", "", True),
        ("[x]", "[x]", True),  # no character classes: brackets are literal
        ("a.b", "axb", False),
        ("x\ny", "x\ny", True),
    ],
)
def test_glob_cases(pattern: str, text: str, expected: bool) -> None:
    assert glob_matches(pattern, text) is expected
    assert _reference(pattern, text) is expected


@settings(max_examples=500, deadline=None)
@given(
    pattern=st.text(alphabet="ab/*?", max_size=10),
    text=st.text(alphabet="ab/", max_size=14),
)
def test_glob_matches_the_definition(pattern: str, text: str) -> None:
    assert glob_matches(pattern, text) is _reference(pattern, text)


def test_pathological_globs_do_not_backtrack() -> None:
    """A backtracking matcher needs ~len(text)**11 steps here (years); a linear one
    answers at once. Run in a subprocess so the old matcher can be killed: the 60 s
    limit only separates "instant" from "never", it measures nothing."""
    code = (
        "from fidelity_mw.policy import glob_matches\n"
        "assert not glob_matches('*a' * 11 + 'b', 'a' * 300)\n"
        "assert not glob_matches('/api/*/items/*/raw', '/api/' + 'items/' * 6000)\n"
        "assert glob_matches('/api/*/items/*/raw', '/api/' + 'x/' * 16000 + 'items/1/raw')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
