"""Find the line of a policy key path (`rate_limit[1].rate`) in TOML text.

`tomllib` returns plain data without positions, so `fidelity-mw check` scans
the text itself. This is a lenient scanner, not a validator: the file has
already been parsed by `tomllib` (or failed to, with its own line number).
It understands what policy files use:

- `[table]` and `[[array]]` headers, including `[upstream.retry]` under the
  latest `[[upstream]]` (so it becomes `upstream[1].retry`);
- dotted keys (`retry.attempts = 3`) and quoted keys;
- inline tables (`retry = { attempts = 3 }`), also nested and inside arrays
  (`rate_limit = [{ name = "a" }, { name = "b" }]` gives `rate_limit[1].name`);
- multi-line arrays and all four string forms, so text inside strings and
  comments is never mistaken for a key.

A path that is not in the file (a default that failed a cross-check, say)
falls back to its closest enclosing table that is: `rate_limit[1].name` ->
the `[[rate_limit]]` header of the second limit.
"""

from __future__ import annotations

import bisect
import contextlib
import re
from dataclasses import dataclass, field

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[(\d+)\]")
_TOML_ERROR_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


class _Stop(Exception):
    """The text stopped looking like TOML: keep what was found so far."""


@dataclass
class KeyLines:
    """Key path -> 1-based line of its first mention in the TOML text."""

    lines: dict[str, int] = field(default_factory=dict)

    def exact(self, path: str) -> int | None:
        return self.lines.get(path)

    def line_for(self, path: str) -> int | None:
        """The line of `path`, else of its nearest enclosing key or table; None if none."""
        candidate = path
        while candidate:
            for variant in _variants(candidate):
                line = self.lines.get(variant)
                if line is not None:
                    return line
            candidate = _parent(candidate)
        return None


def _variants(path: str) -> tuple[str, ...]:
    """`rate_limit[0].x` may be written as a single `[rate_limit]` table (no index)."""
    unindexed = _INDEX.sub(lambda m: "" if m.group(1) == "0" else m.group(0), path)
    return (path,) if unindexed == path else (path, unindexed)


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    dot = path.rfind(".")
    return path[:dot] if dot > 0 else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def toml_error_position(message: str) -> tuple[int, int] | None:
    """(line, column) from a `tomllib.TOMLDecodeError` message, if it names one."""
    m = _TOML_ERROR_LINE.search(message)
    return (int(m.group(1)), int(m.group(2))) if m else None


def locate_keys(text: str) -> KeyLines:
    """Scan TOML text and map every key path it mentions to its line."""
    scanner = _Scanner(text)
    with contextlib.suppress(_Stop, IndexError):
        scanner.document()
    return KeyLines(scanner.found)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self.found: dict[str, int] = {}
        self.array_counts: dict[str, int] = {}
        self.prefix = ""

    # ------------------------------------------------------------ basics

    def line_at(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def record(self, path: str, pos: int, *, first_only: bool = False) -> None:
        if first_only and path in self.found:
            return
        self.found[path] = self.line_at(pos)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_inline_space(self) -> None:
        while not self.at_end() and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def skip_space_newlines_comments(self) -> None:
        while not self.at_end():
            ch = self.text[self.pos]
            if ch in " \t\r\n":
                self.pos += 1
            elif ch == "#":
                self.skip_comment()
            else:
                return

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise _Stop
        self.pos += 1

    # ------------------------------------------------------------ document

    def document(self) -> None:
        while True:
            self.skip_space_newlines_comments()
            if self.at_end():
                return
            start = self.pos
            if self.peek(2) == "[[":
                self.pos += 2
                keys = self.keys("]")
                self.expect("]")
                self.expect("]")
                self.array_header(keys, start)
            elif self.peek() == "[":
                self.pos += 1
                keys = self.keys("]")
                self.expect("]")
                self.table_header(keys, start)
            else:
                self.key_value(self.prefix)
            self.skip_inline_space()
            self.skip_comment()

    def resolve(self, keys: list[str]) -> str:
        """Join header keys, stepping into the latest element of each array of tables."""
        path = ""
        for key in keys:
            path = _join(path, key)
            count = self.array_counts.get(path)
            if count:
                path = f"{path}[{count - 1}]"
        return path

    def table_header(self, keys: list[str], start: int) -> None:
        # `[breaker.extra.deep]` also defines `breaker.extra`, the key an unknown-key
        # error names: its line is this header's, unless it appeared earlier
        for depth in range(1, len(keys)):
            self.record(self.resolve(keys[:depth]), start, first_only=True)
        self.prefix = self.resolve(keys)
        self.record(self.prefix, start, first_only=True)

    def array_header(self, keys: list[str], start: int) -> None:
        base = _join(self.resolve(keys[:-1]), keys[-1])
        index = self.array_counts.get(base, 0)
        self.array_counts[base] = index + 1
        self.record(base, start, first_only=True)
        self.prefix = f"{base}[{index}]"
        self.record(self.prefix, start)

    # ------------------------------------------------------------ keys

    def keys(self, terminator: str) -> list[str]:
        """A dotted key; stops before `terminator` (`=` or `]`)."""
        parts: list[str] = []
        while True:
            self.skip_inline_space()
            parts.append(self.simple_key())
            self.skip_inline_space()
            if self.peek() == ".":
                self.pos += 1
                continue
            if self.peek() == terminator:
                return parts
            raise _Stop

    def simple_key(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.basic_string()
        if ch == "'":
            return self.literal_string()
        m = _BARE_KEY.match(self.text, self.pos)
        if not m:
            raise _Stop
        self.pos = m.end()
        return m.group(0)

    def key_value(self, prefix: str) -> None:
        start = self.pos
        parts = self.keys("=")
        self.expect("=")
        path = prefix
        for part in parts[:-1]:
            path = _join(path, part)
            self.record(path, start, first_only=True)
        path = _join(path, parts[-1])
        self.record(path, start)
        self.skip_inline_space()
        self.value(path)

    # ------------------------------------------------------------ values

    def value(self, path: str) -> None:
        ch = self.peek()
        if self.peek(3) in ('"""', "'''"):
            self.multiline_string(self.peek(3))
        elif ch == '"':
            self.basic_string()
        elif ch == "'":
            self.literal_string()
        elif ch == "[":
            self.array(path)
        elif ch == "{":
            self.inline_table(path)
        else:
            self.scalar()

    def scalar(self) -> None:
        start = self.pos
        while not self.at_end() and self.text[self.pos] not in ",]}#\r\n":
            self.pos += 1
        if self.pos == start:
            raise _Stop

    def basic_string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            ch = self.text[self.pos]
            if ch == "\\":
                out.append(self.text[self.pos : self.pos + 2])
                self.pos += 2
            elif ch == '"':
                self.pos += 1
                return "".join(out)
            elif ch == "\n":
                raise _Stop
            else:
                out.append(ch)
                self.pos += 1

    def literal_string(self) -> str:
        self.expect("'")
        end = self.text.find("'", self.pos)
        if end < 0 or "\n" in self.text[self.pos : end]:
            raise _Stop
        value = self.text[self.pos : end]
        self.pos = end + 1
        return value

    def multiline_string(self, quote: str) -> None:
        self.pos += 3
        while True:
            end = self.text.find(quote, self.pos)
            if end < 0:
                raise _Stop
            if quote == '"""' and _escaped(self.text, end):
                self.pos = end + 1
                continue
            self.pos = end + 3
            # Up to two quotes may sit right before the closing delimiter.
            while self.peek() == quote[0] and self.pos - end < 5:
                self.pos += 1
            return

    def array(self, path: str) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_space_newlines_comments()
            if self.peek() == "]":
                self.pos += 1
                return
            item = f"{path}[{index}]"
            self.record(item, self.pos)
            self.value(item)
            index += 1
            self.skip_space_newlines_comments()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise _Stop

    def inline_table(self, path: str) -> None:
        self.expect("{")
        while True:
            self.skip_space_newlines_comments()
            if self.peek() == "}":
                self.pos += 1
                return
            self.key_value(path)
            self.skip_space_newlines_comments()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                raise _Stop


def _escaped(text: str, pos: int) -> bool:
    """Is the character at `pos` escaped by an odd run of backslashes?"""
    backslashes = 0
    i = pos - 1
    while i >= 0 and text[i] == "\\":
        backslashes += 1
        i -= 1
    return backslashes % 2 == 1
