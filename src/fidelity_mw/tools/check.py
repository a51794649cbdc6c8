"""`fidelity-mw check`: validate policy files; every problem with file, line and key path.

Errors come from `Policy.from_toml` (the same validation the middleware runs),
placed on a line by `policy.lines`. Warnings are things that validate but
cannot be what the author meant: a `[[route]]` or `[[upstream]]` that an
earlier, broader entry always matches first (first match wins).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PolicyError
from ..policy import Policy, RouteConfig, UpstreamConfig
from ..policy.lines import KeyLines, locate_keys, toml_error_position


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in one file. `line` is 1-based, or None when no line applies."""

    file: str
    line: int | None
    path: str
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.path}:" if self.path else ""
        tag = "" if self.severity == "error" else " warning:"
        return f"{where}:{tag}{key} {self.message}"


@dataclass
class CheckResult:
    """The outcome for one file."""

    file: str
    policy: Policy | None = None
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "ok": self.ok,
            "version": self.policy.version if self.policy is not None else None,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
        }


def check_file(path: str | Path) -> CheckResult:
    """Validate one policy file. Raises OSError when it cannot be read at all."""
    name = str(path)
    text = Path(path).read_text(encoding="utf-8")
    result = CheckResult(name)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pos = toml_error_position(str(exc))
        line = pos[0] if pos else None
        result.errors.append(Finding(name, line, "", f"not valid TOML: {exc}"))
        return result
    lines = locate_keys(text)
    try:
        result.policy = Policy.from_toml(path)
    except PolicyError as exc:
        for issue in exc.issues:
            result.errors.append(Finding(name, _line(lines, issue.path), issue.path, issue.message))
        return result
    result.warnings.extend(_shadowed(name, lines, result.policy))
    return result


def _line(lines: KeyLines, path: str) -> int | None:
    return lines.line_for(path) if path else None


def _covers(
    first_glob: str, first_methods: tuple[str, ...] | None, glob: str, methods: object
) -> bool:
    if first_glob not in ("*", glob):
        return False
    if first_methods is None:
        return True
    if not isinstance(methods, tuple):
        return False
    return set(methods) <= set(first_methods)


def _shadowed(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """Entries that can never match because an earlier entry matches everything they do."""
    out: list[Finding] = []
    routes: tuple[RouteConfig, ...] = policy.routes
    for i, route in enumerate(routes):
        for j in range(i):
            earlier = routes[j]
            if _covers(earlier.match, earlier.methods, route.match, route.methods):
                path = f"route[{i}].match"
                out.append(
                    Finding(
                        name,
                        lines.line_for(path),
                        path,
                        f"never used: route[{j}] (match {earlier.match!r}) comes first and "
                        "matches every request this one would (first match wins); "
                        "move the narrower route up",
                        "warning",
                    )
                )
                break
    upstreams: tuple[UpstreamConfig, ...] = policy.upstreams
    for i, upstream in enumerate(upstreams):
        for j in range(i):
            if upstreams[j].host in ("*", upstream.host):
                path = f"upstream[{i}].host"
                out.append(
                    Finding(
                        name,
                        lines.line_for(path),
                        path,
                        f"never used: upstream[{j}] (host {upstreams[j].host!r}) comes first and "
                        "matches every host this one would (first match wins); "
                        "move the narrower upstream up",
                        "warning",
                    )
                )
                break
    return out
