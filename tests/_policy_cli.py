"""What the policy and CLI defect tests share: the CLI run in process, a policy's issues."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest

from fidelity_mw import Policy
from fidelity_mw.errors import PolicyError
from fidelity_mw.tools.cli import main


def run(argv: list[str]) -> tuple[int, str]:
    """`fidelity-mw ARGV` in process: its exit code and everything it printed."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


def issues_of(data: dict[str, object]) -> dict[str, str]:
    """The issues `Policy.from_dict(data)` refuses it for, by field path."""
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(data)
    return {issue.path: issue.message for issue in caught.value.issues}
