"""`fidelity-mw audit`: find scattered retry, breaker and limiter logic by static analysis.

The scan parses every `.py` file under the given paths (nothing is imported or
run) and reports, with file and line:

- library entry points, resolved through the file's imports, so a local
  function that happens to be called `retry` is not flagged: tenacity,
  backoff, stamina, retrying, retry, aiohttp-retry, urllib3 `Retry`,
  requests `HTTPAdapter(max_retries=N)`,
  httpx transports with `retries=N` (N != 0), httpx-retries, pybreaker,
  aiobreaker, circuitbreaker, purgatory, slowapi, limits, fastapi-limiter;
- the all-in-one toolkits nopanic, pyresilience and throttled-py (see
  `toolkits`): one finding per concern of a stack (`@compose(...)`,
  `@resilient(...)`, a preset), timeouts, deadlines, bulkheads and hedges
  included, and what stays with them (a fallback, a cache, a client-side limit);
- uses of the objects those create (`@limiter.limit("5/minute")`,
  `@breaker`, `breaker.call(f)`), with the route path when one is declared,
  also in other scanned modules that import them;
- hand-written retry loops, by what they do (see `retryloops`): a loop that
  makes the same call again after catching its failure or checking its
  status, and leaves on success, with or without a sleep; a function that calls
  itself again with its attempt count moved on; and hand-written breakers (a
  class named for one that counts failures and reads a clock).

Retries configured off (`Retry(total=0)`, `stop_after_attempt(1)`,
`max_retries=0`...) are not reported. Each finding carries a confidence and a
remedy that fits the client library in use: FidelityTransport wraps httpx
only, so requests, urllib3 and aiohttp calls are told to turn their retries
off and move to httpx, or to be marked out of scope; a library's own retry
setting is told to be set to zero rather than replaced. A line that ends with
`# fidelity-mw: ignore` is skipped.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import re
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from . import retryon, toolkits
from .retryloops import (
    HIGH,
    LOW,
    MEDIUM,
    LoopReader,
    LoopVerdict,
    dotted_name,
    recursive_retry,
    sleeping_functions,
)

_T = TypeVar("_T")
_D = TypeVar("_D")

RETRY = toolkits.RETRY
BREAKER = toolkits.BREAKER
LIMITER = toolkits.LIMITER
TIMEOUT = toolkits.TIMEOUT
BULKHEAD = toolkits.BULKHEAD
HEDGE = toolkits.HEDGE
KINDS = (RETRY, BREAKER, LIMITER, TIMEOUT, BULKHEAD, HEDGE)
CORE_KINDS = (RETRY, BREAKER, LIMITER)  # always counted in the text summary

CONFIDENCES = (HIGH, MEDIUM, LOW)
FIDELITY_RETRY = "upstream[].retry (attempts, base_ms, max_ms, jitter) via FidelityTransport"
REPLACE = {
    RETRY: FIDELITY_RETRY,
    BREAKER: "upstream[].breaker (outbound) or breaker / route[].breaker (inbound)",
    LIMITER: "rate_limit[] (rate, burst, key, match)",
    TIMEOUT: "upstream[].attempt_timeout_ms (one attempt) or [deadline] default_ms / "
    "route[].deadline_ms (the whole call)",
    BULKHEAD: "route[].concurrency or [concurrency] (inbound)",
    HEDGE: "upstream[].hedge (after_ms, max_hedges) via FidelityTransport",
}
HTTP_LIBRARIES = ("httpx", "requests", "urllib3", "aiohttp")
# What to do with a retry, by the client library its calls go through.
RETRY_REMEDY: dict[str | None, str] = {
    "httpx": FIDELITY_RETRY,
    "requests": "requests cannot go through FidelityTransport (httpx only): turn these "
    "retries off (max_retries=0 / Retry(total=0)) and move the call to httpx with "
    "FidelityTransport and upstream[].retry, or mark it out of scope (# fidelity-mw: ignore)",
    "urllib3": "urllib3 cannot go through FidelityTransport (httpx only): turn these "
    "retries off (Retry(total=0)) and move the call to httpx with FidelityTransport and "
    "upstream[].retry, or mark it out of scope (# fidelity-mw: ignore)",
    "aiohttp": "aiohttp cannot go through FidelityTransport (httpx only): move the call to "
    "httpx.AsyncClient with FidelityTransport and upstream[].retry, or mark it out of "
    "scope (# fidelity-mw: ignore)",
    None: "no httpx call seen: FidelityTransport only owns httpx calls; if this is HTTP, "
    "move it to httpx with FidelityTransport and upstream[].retry, otherwise mark it out "
    "of scope (# fidelity-mw: ignore)",
}

DEFAULT_EXCLUDES = (
    ".git",
    ".hg",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    "node_modules",
    "__pycache__",
    "site-packages",
    "build",
    "dist",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)

IGNORE_PRAGMA = "fidelity-mw: ignore"


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str
    library: str
    api: str = ""  # the toolkits' API name (`toolkits.APIS`); "" for the others
    # a slowapi Limiter's own key_func, as a rate_limit[] key ("" for the client's IP,
    # "header:NAME", or "fn:NAME" for a function with no policy form): its routes' key
    key: str = ""


def _rules() -> dict[str, Rule]:
    table: dict[str, Rule] = {}

    def add(kind: str, library: str, *names: str) -> None:
        for name in names:
            table[name] = Rule(kind, library)

    add(
        RETRY,
        "tenacity",
        "tenacity.retry",
        "tenacity.Retrying",
        "tenacity.AsyncRetrying",
        "tenacity.asyncio.AsyncRetrying",
    )
    add(RETRY, "backoff", "backoff.on_exception", "backoff.on_predicate")
    # the older decorators still common in scripts and services: retrying
    # (`@retry(stop_max_attempt_number=3, wait_fixed=2000)`), retry (`@retry(tries=3,
    # delay=1, backoff=2)`, `retry_call(f, ...)`), and aiohttp-retry's client
    add(RETRY, "retrying", "retrying.retry", "retrying.Retrying")
    add(
        RETRY, "retry", "retry.retry", "retry.api.retry", "retry.retry_call", "retry.api.retry_call"
    )
    add(RETRY, "aiohttp-retry", "aiohttp_retry.RetryClient")
    add(
        RETRY,
        "stamina",
        "stamina.retry",
        "stamina.retry_context",
        "stamina.RetryingCaller",
        "stamina.AsyncRetryingCaller",
    )
    add(
        RETRY,
        "urllib3",
        "urllib3.Retry",
        "urllib3.util.Retry",
        "urllib3.util.retry.Retry",
        "requests.adapters.Retry",
        "requests.packages.urllib3.util.retry.Retry",
    )
    add(RETRY, "httpx-retries", "httpx_retries.RetryTransport")
    add(BREAKER, "pybreaker", "pybreaker.CircuitBreaker")
    add(BREAKER, "aiobreaker", "aiobreaker.CircuitBreaker")
    add(BREAKER, "circuitbreaker", "circuitbreaker.circuit", "circuitbreaker.CircuitBreaker")
    add(
        BREAKER,
        "purgatory",
        "purgatory.AsyncCircuitBreakerFactory",
        "purgatory.SyncCircuitBreakerFactory",
    )
    add(
        LIMITER,
        "slowapi",
        "slowapi.Limiter",
        "slowapi.extension.Limiter",
        "slowapi.middleware.SlowAPIMiddleware",
        "slowapi.middleware.SlowAPIASGIMiddleware",
    )
    for pkg in ("limits.strategies", "limits.aio.strategies"):
        add(
            LIMITER,
            "limits",
            *(
                f"{pkg}.{cls}"
                for cls in (
                    "FixedWindowRateLimiter",
                    "MovingWindowRateLimiter",
                    "SlidingWindowCounterRateLimiter",
                )
            ),
        )
    add(
        LIMITER,
        "fastapi-limiter",
        "fastapi_limiter.FastAPILimiter",
        "fastapi_limiter.depends.RateLimiter",
        "fastapi_limiter.depends.WebSocketRateLimiter",
    )
    for name, api in toolkits.APIS.items():
        if api.kind is not None:
            table[name] = Rule(api.kind, api.library, api.name)
    return table


RULES = _rules()
# `from tenacity import *` binds what the module exports: the names of RULES under it
_STAR_NAMES: dict[str, set[str]] = {}
for _name in RULES:
    _module, _, _attr = _name.rpartition(".")
    _STAR_NAMES.setdefault(_module, set()).add(_attr)
_STAR_NAMES["tenacity"] |= {"stop_after_attempt", "retry_never"}  # what turns one off
# Calls whose retries depend on a keyword: (qualified name, keyword, library).
KEYWORD_RETRIES = {
    "httpx.HTTPTransport": ("retries", "httpx"),
    "httpx.AsyncHTTPTransport": ("retries", "httpx"),
    "requests.adapters.HTTPAdapter": ("max_retries", "requests"),
}
# SDK clients that retry on their own unless told not to: (keyword, library, default).
SDK_RETRIES = {
    f"{pkg}.{cls}": ("max_retries", pkg, 2)
    for pkg, classes in (
        ("openai", ("OpenAI", "AsyncOpenAI", "AzureOpenAI", "AsyncAzureOpenAI")),
        ("anthropic", ("Anthropic", "AsyncAnthropic")),
    )
    for cls in classes
}
# Methods of library objects that apply them (decorators or calls).
INSTANCE_METHODS = {
    LIMITER: {"limit", "shared_limit", "hit", "test", "exempt"},
    BREAKER: {"call", "call_async", "calling", "get_breaker"},
    RETRY: {"wraps", "__call__"},
    TIMEOUT: set(),
    BULKHEAD: set(),
    HEDGE: set(),
}
# ... and the toolkits' policies: `policy.call(fn)`, `await policy.acall(fn)`, a block
# under `with policy.guard():`, throttled-py's `throttle.limit(key)`
TOOLKIT_METHODS = {"call", "acall", "guard", "limit"}
ROUTE_DECORATORS = {
    "get",
    "post",
    "put",
    "patch",
    "delete",
    "head",
    "options",
    "route",
    "api_route",
}


# Class methods that build (or set up) what their class does.
_FACTORIES = (".from_int", ".init")


@dataclass(frozen=True, slots=True)
class AuditFinding:
    file: str
    line: int
    kind: str  # retry | breaker | limiter
    library: str  # tenacity, ..., or "hand-written"
    what: str
    replace_with: str
    confidence: str = HIGH  # high | medium | low: how sure the scan is that this is one
    # the host an outbound concern guards, from the URLs written in its code (or the
    # base_url of its client or the module's): the `[[upstream]]` table its values go in;
    # None when unknown
    host: str | None = None

    def __str__(self) -> str:
        where = f'; in [[upstream]] host = "{self.host}"' if self.host else ""
        return (
            f"{self.file}:{self.line}: {self.kind} ({self.confidence}): {self.what} -> "
            f"{self.replace_with}{where}"
        )


@dataclass
class AuditReport:
    findings: list[AuditFinding] = field(default_factory=list)
    scanned: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # files named on the command line that are not Python (`audit config.yaml`, a shell
    # glob's `*`): not scanned, and not "could not be read" either (`is_python_file`)
    not_python: list[str] = field(default_factory=list)

    def keep_at_least(self, confidence: str) -> None:
        """Drop findings less sure than `confidence` (high > medium > low)."""
        floor = CONFIDENCES.index(confidence)
        self.findings = [f for f in self.findings if CONFIDENCES.index(f.confidence) <= floor]

    def counts(self) -> dict[str, int]:
        counter = Counter(f.kind for f in self.findings)
        return {k: counter.get(k, 0) for k in KINDS}

    def summary_counts(self) -> dict[str, int]:
        """The counts the text summary shows: retry, breaker and limiter always, the
        toolkits' other kinds (timeout, bulkhead, hedge) when there are any."""
        return {k: n for k, n in self.counts().items() if k in CORE_KINDS or n}

    def to_json(self) -> dict[str, object]:
        return {
            "scanned": self.scanned,
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
            "skipped": [{"file": f, "error": e} for f, e in self.skipped],
            "not_python": list(self.not_python),
        }


# ---------------------------------------------------------------- files


def iter_python_files(paths: Sequence[str], excludes: Iterable[str] = ()) -> Iterator[Path]:
    """Every .py file under `paths`, sorted, skipping excluded directory names and globs."""
    patterns = tuple(excludes)

    def excluded(p: Path) -> bool:
        return p.name in DEFAULT_EXCLUDES or any(
            fnmatch.fnmatch(p.as_posix(), pat) or fnmatch.fnmatch(p.name, pat) for pat in patterns
        )

    for raw in paths:
        root = Path(raw)
        if root.is_file():
            if not excluded(root):
                yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not excluded(base / d))
            for name in sorted(filenames):
                path = base / name
                if name.endswith(".py") and not excluded(path):
                    yield path


PYTHON_SUFFIXES: Final = (".py", ".pyw", ".pyi")


def is_python_file(path: Path) -> bool:
    """Whether a file named by the user is Python: a `.py` (`.pyw`, `.pyi`) file, or one
    without a suffix whose first line runs Python (`#!/usr/bin/env python3`). Another
    (a YAML file, a shell script) was parsed as Python: reported as a SyntaxError, or
    "scanned" when its text happened to parse (`key: value` is an annotation)."""
    if path.suffix.lower() in PYTHON_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as fh:
            first = fh.readline(200)
    except OSError:
        return True  # (read as Python: its read fails and says why, as before)
    return first.startswith(b"#!") and b"python" in first


def module_name(path: Path, root: Path) -> str:
    """`root/service/routes.py` -> `service.routes`; `pkg/__init__.py` -> `pkg`."""
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def audit_paths(paths: Sequence[str], excludes: Iterable[str] = ()) -> AuditReport:
    """Scan files in two passes: first every module's library objects (`limiter =
    Limiter(...)`), so that a use in another module (`from .limits import limiter`)
    is found too; then every use."""
    report = AuditReport()
    parsed: list[tuple[Path, str, ast.Module, str]] = []
    for raw in paths:
        root = Path(raw)
        for path in iter_python_files([raw], excludes):
            if path == root and not is_python_file(path):
                report.not_python.append(path.as_posix())
                continue
            try:
                source = read_source(path)
                tree = ast.parse(source, filename=str(path))
            except _UNREADABLE as exc:
                report.skipped.append((path.as_posix(), f"{type(exc).__name__}: {exc}"))
                continue
            parsed.append((path, source, tree, module_name(path, root)))
    shared: dict[str, Rule] = {}
    routers = Routers()
    imports: list[dict[str, str]] = []
    for path, _, tree, module in parsed:
        scanner = _Scanner(path.as_posix(), module, shared)
        scanner.collect_imports(tree)
        scanner.collect_module_objects(tree)
        scanner.collect_routers(tree, routers)
        imports.append(scanner.aliases)
    for (path, source, tree, module), aliases in zip(parsed, imports, strict=True):
        try:
            found = audit_tree(tree, source, path.as_posix(), module, shared, aliases, routers)
        except RecursionError as exc:  # `a + b + ...` of hundreds of terms: the visit nests
            report.skipped.append((path.as_posix(), f"too deeply nested to scan ({exc})"))
            continue
        report.scanned += 1
        report.findings.extend(found)
    return report


# A file the scan cannot read is reported as skipped, never the end of the whole audit:
# a dangling symlink or an unreadable file (OSError), bytes that are not its encoding, a
# syntax error, or an expression nested too deep for the parser.
_UNREADABLE = (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError, MemoryError)


def read_source(path: Path) -> str:
    """The text of a Python file, decoded as Python decodes it: a UTF-8 byte-order mark
    or a PEP 263 coding line (`# -*- coding: latin-1 -*-`) says how; UTF-8 otherwise."""
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)


def audit_source(source: str, filename: str = "<string>") -> list[AuditFinding]:
    return audit_tree(ast.parse(source, filename=filename), source, filename)


def audit_tree(
    tree: ast.Module,
    source: str,
    filename: str,
    module: str = "",
    shared: dict[str, Rule] | None = None,
    aliases: dict[str, str] | None = None,
    routers: Routers | None = None,
) -> list[AuditFinding]:
    """`aliases`: the module's imports, when the caller collected them already;
    `routers`: the FastAPI routers of all the modules scanned, and their prefixes."""
    scanner = _Scanner(filename, module, shared, sleeping_functions(tree))
    if aliases is None:
        scanner.collect_imports(tree)
    else:
        scanner.aliases = dict(aliases)
    if routers is None:
        routers = Routers()
        scanner.collect_routers(tree, routers)
    scanner.routers = routers
    scanner.prepare(tree)
    scanner.visit(tree)
    lines = source.splitlines()
    kept = [
        f
        for f in scanner.findings
        if not (0 < f.line <= len(lines) and IGNORE_PRAGMA in lines[f.line - 1])
    ]
    seen: set[tuple[int, str, str]] = set()
    unique: list[AuditFinding] = []
    for f in sorted(kept, key=lambda f: (f.line, f.kind, f.what)):
        if (f.line, f.kind, f.what) not in seen:
            seen.add((f.line, f.kind, f.what))
            unique.append(f)
    return unique


# ---------------------------------------------------------------- the scanner


@dataclass
class Routers:
    """FastAPI routers across the scanned modules, by qualified name (`app.items.router`):
    the `prefix` each is made with, and where each is included (`app.include_router(
    items.router, prefix="/api/v1")`): a route's path is all of them, outermost first."""

    own: dict[str, str] = field(default_factory=dict)
    included: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (into, prefix)

    def prefix(self, key: str) -> str:
        """Everything before a route's own path on router `key`."""
        out, seen = "", set()
        while key and key not in seen:
            seen.add(key)
            out = _lookup(self.own, key, "") + out
            into = _lookup(self.included, key, None)
            if into is None:
                break
            key, at = into
            out = at + out
        return out


def _lookup(table: dict[str, _T], key: str, default: _D) -> _T | _D:
    """`table[key]`, or the entry one of the two names ends with: a module named from
    another root (`service.app.items.router` for `app.items.router`)."""
    if key in table:
        return table[key]
    for name, value in table.items():
        if name.endswith("." + key) or key.endswith("." + name):
            return value
    return default


def _literal(node: ast.expr | None) -> object:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


_NOT_LITERAL = object()


# the kinds that guard calls to an upstream, whose values go in its `[[upstream]]` table
_HOSTED_KINDS = (RETRY, BREAKER, TIMEOUT, HEDGE)


def _url_hosts(region: ast.AST) -> set[str]:
    """The hosts of the absolute http(s) URLs written in `region`: string literals and
    the literal start of f-strings (`f"https://payments.internal/{id}"`)."""
    hosts = set()
    # an f-string's literal parts are walked on their own too: read them as its parts
    parts = {
        id(part)
        for node in ast.walk(region)
        if isinstance(node, ast.JoinedStr)
        for part in node.values
    }
    for node in ast.walk(region):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in parts:
                continue
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                # a placeholder in the authority leaves its literal part cut short:
                # only a host the text holds whole counts
                rest = node.values[1:]
                text = first.value if not rest or "/" in first.value[8:] else None
        if text is None or not text.startswith(("http://", "https://")):
            continue
        try:
            host = urlsplit(text).hostname
        except ValueError:  # a malformed literal (an unclosed IPv6 bracket)
            continue
        if host:
            hosts.add(host)
    return hosts


_CLIENTS = {
    "httpx.Client",
    "httpx.AsyncClient",
    "requests.Session",
    "requests.session",
    "aiohttp.ClientSession",
}


def _base_url_hosts(call: ast.Call) -> set[str]:
    """The host of a client's literal `base_url` (aiohttp's is its first argument)."""
    given = next((k.value for k in call.keywords if k.arg == "base_url"), None)
    if given is None and call.args and isinstance(call.args[0], ast.Constant | ast.JoinedStr):
        given = call.args[0]
    return _url_hosts(given) if given is not None else set()


def _one(hosts: set[str]) -> str | None:
    return next(iter(hosts)) if len(hosts) == 1 else None


def _short(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


class _Scanner(ast.NodeVisitor):
    def __init__(
        self,
        filename: str,
        module: str = "",
        shared: dict[str, Rule] | None = None,
        sleepers: set[str] | None = None,
    ) -> None:
        self.filename = filename
        self.loops = LoopReader(self.resolve, sleepers or set())
        self.module = module
        self.is_package = Path(filename).name == "__init__.py"
        # `module.name` -> rule, for library objects bound at module level, across files
        self.shared: dict[str, Rule] = shared if shared is not None else {}
        self.aliases: dict[str, str] = {}
        self.instances: dict[str, Rule] = {}
        self.findings: list[AuditFinding] = []
        self.handled: set[int] = set()
        self.function: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.classes: list[ast.ClassDef] = []
        # the toolkits: where each concern applies, by id of the call that makes it
        self.ctx: dict[int, toolkits.Ctx] = {}
        self.assigned: dict[str, ast.Call] = {}  # module level: name = call(...)
        self.created: dict[str, ast.Call] = {}  # library objects: name -> the call
        self.routers = Routers()
        # the hosts of the `base_url` of the clients the module binds to a name
        # (`client = httpx.AsyncClient(base_url=...)`, `self.api = ...`), by that name
        self.client_hosts: dict[str, set[str]] = {}
        # the client construction (`httpx.AsyncClient(...)`) each node is part of
        self.client_of: dict[int, ast.Call] = {}

    # ------------------------------------------------------------ imports

    def collect_imports(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        self.aliases[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = self._from_base(node)
                for alias in node.names:
                    if base and alias.name != "*":
                        self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif base:  # `from pybreaker import *`: the library's names we know
                        for name in _STAR_NAMES.get(base, ()):
                            self.aliases.setdefault(name, f"{base}.{name}")

    def _from_base(self, node: ast.ImportFrom) -> str | None:
        """The module a `from X import` names; relative imports resolved against ours."""
        if not node.level:
            return node.module
        parts = self.module.split(".") if self.module else []
        if not self.is_package:
            parts = parts[:-1]
        if node.level - 1 > len(parts):
            return None
        parts = parts[: len(parts) - (node.level - 1)]
        if node.module:
            parts.append(node.module)
        return ".".join(parts) or None

    def collect_module_objects(self, tree: ast.Module) -> None:
        """`limiter = Limiter(...)` at module level: shared with the other files."""
        for stmt in tree.body:
            value: ast.expr | None
            if isinstance(stmt, ast.Assign):
                value, targets = stmt.value, stmt.targets
            elif isinstance(stmt, ast.AnnAssign):
                value, targets = stmt.value, [stmt.target]
            else:
                continue
            if not isinstance(value, ast.Call):
                continue
            found = self.rule_for(self.resolve(value.func))
            if found is None:
                continue
            for target in targets:
                if isinstance(target, ast.Name):
                    self.shared[f"{self.module}.{target.id}"] = _with_key(found[1], value)

    def collect_routers(self, tree: ast.Module, routers: Routers) -> None:
        """This module's `router = APIRouter(prefix=...)` and `x.include_router(router,
        prefix=...)`, into `routers` (module level: where apps and routers are put
        together)."""
        for stmt in tree.body:
            if (
                isinstance(stmt, ast.Assign)
                and isinstance(stmt.value, ast.Call)
                and last_name_of(stmt.value.func) in ("APIRouter", "FastAPI")
            ):
                given = next((k.value for k in stmt.value.keywords if k.arg == "prefix"), None)
                prefix = _literal(given) if given is not None else ""
                for target in stmt.targets:
                    if isinstance(target, ast.Name) and isinstance(prefix, str):
                        routers.own[self.qualified(target.id)] = prefix
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "include_router"
                and node.args
            ):
                continue
            child, into = self.object_key(node.args[0]), self.object_key(node.func.value)
            given = next((k.value for k in node.keywords if k.arg == "prefix"), None)
            prefix = _literal(given) if given is not None else ""
            if child and into and isinstance(prefix, str):
                routers.included[child] = (into, prefix)

    def qualified(self, name: str) -> str:
        return f"{self.module}.{name}" if self.module else name

    def object_key(self, node: ast.expr) -> str | None:
        """The qualified name of a module-level object: `router` made here, `items.router`
        or `router` imported from another module."""
        if isinstance(node, ast.Name) and node.id not in self.aliases:
            return self.qualified(node.id)
        return self.resolve(node)

    def shared_object(self, name: str | None) -> Rule | None:
        """A library object another scanned module made, imported here under `name`."""
        if not name or "." not in name:
            return None
        for key, rule in self.shared.items():
            if key == name or key.endswith("." + name) or name.endswith("." + key):
                return rule
        return None

    def resolve(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def rule_for(self, name: str | None) -> tuple[str, Rule] | None:
        """The rule for a qualified name, or for the thing it is an attribute of."""
        while name:
            rule = RULES.get(name)
            if rule is not None:
                return name, rule
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return None

    # ------------------------------------------------------------ reporting

    def report(
        self,
        node: ast.AST,
        rule: Rule,
        what: str,
        extra: str = "",
        *,
        region: ast.AST | None = None,
        confidence: str = HIGH,
        remedy: str | None = None,
        outbound: bool = True,
    ) -> None:
        if remedy is None:
            remedy = self.remedy(rule, region)
        replace = remedy + (f"; {extra}" if extra else "")
        if rule.kind == RETRY and outbound and "upstream[].retry" in replace:
            # a loop retries its own body only, not what its function sends after it
            retried = node if isinstance(node, ast.For | ast.AsyncFor | ast.While) else region
            replace += _unsafe_method_note(retried if retried is not None else self._around(node))
        host = None
        # only where the finding's values go in an `[[upstream]]` table (a deadline
        # goes in `[deadline]`)
        if outbound and rule.kind in _HOSTED_KINDS and "upstream[]" in replace:
            host = self.host_of(region if region is not None else self._around(node), node)
        self.findings.append(
            AuditFinding(
                self.filename,
                getattr(node, "lineno", 0),
                rule.kind,
                rule.library,
                what,
                replace,
                confidence,
                host,
            )
        )

    def route_path(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
        """The path a route serves: `@router.get("/{id}")` on `router = APIRouter(prefix=
        "/items")` serves "/items/{id}", the path a `match` must cover."""
        path = _route_path(fn)
        if path is None:
            return None
        for deco in fn.decorator_list:
            if not (_is_route_decorator(deco) and isinstance(deco, ast.Call)):
                continue
            assert isinstance(deco.func, ast.Attribute)
            key = self.object_key(deco.func.value)
            if key:  # as FastAPI joins them: "/items" + "/" is "/items/"
                return self.routers.prefix(key) + path
        return path

    def _around(self, node: ast.AST) -> ast.AST:
        """Where a concern reported without a region applies: its function, or itself."""
        return self.function[-1] if self.function else node

    def host_of(self, region: ast.AST, node: ast.AST | None = None) -> str | None:
        """The one host the URLs written in `region` name; else the one host of the
        `base_url` of the clients it builds, or failing those of the module's clients it
        calls through (the calls' paths relative to it); None when there are none or
        several.

        A retry that is part of building a client (`httpx.AsyncClient(transport=
        RetryTransport(...))`) guards that client's host only: its `base_url`, or none.
        Another client's `base_url`, or a URL another function calls, says nothing
        about a client built for any URL (a factory, a session mounted for "https://")."""
        if node is not None and id(node) in self.client_of:
            return _one(_base_url_hosts(self.client_of[id(node)]))
        hosts = _url_hosts(region)
        if not hosts:
            built = [
                call
                for call in ast.walk(region)
                if isinstance(call, ast.Call) and self.resolve(call.func) in _CLIENTS
            ]
            if built:
                return _one({h for call in built for h in _base_url_hosts(call)})
            # the clients it calls through, by name: their base_url
            for ref in ast.walk(region):
                if isinstance(ref, ast.Name | ast.Attribute):
                    hosts |= self.client_hosts.get(dotted_name(ref) or "", set())
        return _one(hosts)

    def remedy(self, rule: Rule, region: ast.AST | None) -> str:
        if rule.library in toolkits.LIBRARIES:
            return self.toolkit_remedy(rule, self._default_ctx(region))
        if rule.kind != RETRY:
            return REPLACE[rule.kind]
        if rule.library in ("requests", "urllib3"):
            return RETRY_REMEDY[rule.library]
        if rule.library == "httpx":
            return "set retries=0 on this transport and wrap it in FidelityTransport: " + (
                FIDELITY_RETRY.removesuffix(" via FidelityTransport")
            )
        if rule.library == "httpx-retries":
            return FIDELITY_RETRY + " in place of RetryTransport"
        if rule.library == "aiohttp-retry":
            return RETRY_REMEDY["aiohttp"]
        return RETRY_REMEDY[self.client_library(region)]

    def client_library(self, region: ast.AST | None) -> str | None:
        """The HTTP client a piece of code calls through: its own calls first, then
        the one HTTP client the module imports (None when unknown or several)."""
        if region is not None:
            seen = {
                (self.resolve(node) or "").split(".")[0]
                for node in ast.walk(region)
                if isinstance(node, ast.Name | ast.Attribute)
            } & set(HTTP_LIBRARIES)
            if "urllib3" in seen and "requests" in seen:
                seen.discard("urllib3")
            if len(seen) == 1:
                return seen.pop()
            if seen:
                return None
        imported = {v.split(".")[0] for v in self.aliases.values()} & set(HTTP_LIBRARIES)
        if "urllib3" in imported and "requests" in imported:
            imported.discard("urllib3")
        return imported.pop() if len(imported) == 1 else None

    def _mark(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            self.handled.add(id(sub))

    # ------------------------------------------------------------ the toolkits

    def toolkit_api(self, node: ast.AST) -> toolkits.Api | None:
        """The toolkit API a call (or a bare decorator) makes, by its qualified name."""
        target = node.func if isinstance(node, ast.Call) else node
        if not isinstance(target, ast.Name | ast.Attribute):
            return None
        return toolkits.APIS.get(self.resolve(target) or "")

    def _in_asgi_class(self) -> bool:
        """Inside an ASGI middleware (`async def __call__(self, scope, receive, send)`)
        or a Starlette `dispatch(self, request, call_next)`: its limits are inbound."""
        for cls in self.classes:
            for stmt in cls.body:
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                    names = [a.arg for a in stmt.args.args]
                    if (stmt.name == "__call__" and names[1:4] == ["scope", "receive", "send"]) or (
                        stmt.name == "dispatch" and "call_next" in names
                    ):
                        return True
        return False

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if self._hand_written_breaker(node):
            self.report(
                node,
                Rule(BREAKER, "hand-written"),
                f"class {node.name}: a circuit breaker of its own (counts failures, "
                "opens for a time)",
                confidence=MEDIUM,
                region=node,
            )
        self.classes.append(node)
        self.generic_visit(node)
        self.classes.pop()

    def _hand_written_breaker(self, node: ast.ClassDef) -> bool:
        """A class named for a breaker that counts failures and keeps time: a breaker
        written by hand, as often as one from a library. Its exceptions, states and
        listeners count nothing; a library's breaker subclassed is reported as that."""
        if not _BREAKER_NAME.search(node.name):
            return False
        if any(self.rule_for(self.resolve(base)) for base in node.bases):
            return False
        counts = any(  # `self._failures += 1`
            isinstance(n, ast.AugAssign)
            and isinstance(n.op, ast.Add)
            and _FAILURE_COUNT.search(dotted_name(n.target) or "")
            for n in ast.walk(node)
        )
        keeps_time = any(
            isinstance(n, ast.Call) and last_name_of(n.func) in _CLOCKS for n in ast.walk(node)
        )
        return counts and keeps_time

    def _default_ctx(self, region: ast.AST | None) -> toolkits.Ctx:
        if region is None and self.function:
            region = self.function[-1]
        return toolkits.Ctx(region=region)

    def prepare(self, tree: ast.Module) -> None:
        """Before the visit: module-level `name = call(...)`, and the configs handed to
        pyresilience's ResilientMiddleware, whose concerns are inbound."""
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and self.resolve(call.func) in _CLIENTS:
                for sub in ast.walk(call):
                    self.client_of.setdefault(id(sub), call)
        for bind in ast.walk(tree):
            if isinstance(bind, ast.Assign | ast.AnnAssign) and isinstance(bind.value, ast.Call):
                made = bind.value
                if self.resolve(made.func) in _CLIENTS and (hosts := _base_url_hosts(made)):
                    targets = bind.targets if isinstance(bind, ast.Assign) else [bind.target]
                    for target in targets:
                        if name := dotted_name(target):
                            self.client_hosts.setdefault(name, set()).update(hosts)
        for stmt in tree.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Call)
            ):
                self.assigned[stmt.targets[0].id] = stmt.value
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            ref: ast.expr | None = None
            config = next((k.value for k in node.keywords if k.arg == "config"), None)
            api = self.toolkit_api(node)
            if api is not None and api.name == "ResilientMiddleware":
                ref = node
                if config is None and len(node.args) > 1:
                    config = node.args[1]
            elif node.args:
                first = self.toolkit_api(node.args[0])
                if first is not None and first.name == "ResilientMiddleware":
                    ref = node.args[0]  # app.add_middleware(ResilientMiddleware, config=...)
            if ref is None:
                continue
            if isinstance(config, ast.Name):
                config = self.assigned.get(config.id, config)
            stack = self.toolkit_api(config) if config is not None else None
            if config is None or (stack is not None and stack.name == "ResilienceConfig"):
                self._mark(ref)  # reported by its config's concerns; without one it does nothing
                self.handled.add(id(ref))
                if isinstance(config, ast.Call) and stack is not None:
                    where = " in ResilientMiddleware's config"
                    ctx = toolkits.Ctx(where=where, inbound="middleware")
                    self.ctx[id(config)] = ctx
                    self._stack(config, stack, ctx)

    def _stack(self, call: ast.expr, api: toolkits.Api, ctx: toolkits.Ctx) -> None:
        """compose(...), resilient(...), ResilienceConfig(...), keyed(...), a preset:
        each concern in it is reported where it is written, with this context."""
        if not isinstance(call, ast.Call):
            return
        if api.name in toolkits.PRESETS:
            self._preset(call, api, ctx)
            return
        members: list[tuple[ast.expr, str]] = []
        keyed = False
        if api.name == "compose":
            members = [(a, _short(a)) for a in call.args]
        elif api.name in ("resilient", "ResilienceConfig"):
            members = [
                (k.value, f"{k.arg}=" if k.arg else _short(k.value))
                for k in call.keywords
                if k.arg is None or k.arg in toolkits.COMPONENTS
            ]
        elif api.name == "keyed":
            factory = call.args[0] if call.args else None
            factory = factory or next((k.value for k in call.keywords if k.arg == "factory"), None)
            if isinstance(factory, ast.Lambda):
                members = [(factory.body, _short(factory.body))]
            keyed = True
        keep = tuple(label for member, label in members if self._no_counterpart(member, label, ctx))
        stack = f"@{api.name}" if ctx.where.startswith(" in @") else f"{api.name}(...)"
        for i, (member, label) in enumerate(members):
            inner_retry = any(self._applies_retry(m) for m, _ in members[i + 1 :])
            own = toolkits.Ctx(
                where=ctx.where,
                region=ctx.region,
                route=ctx.route,
                fn=ctx.fn,
                inbound=ctx.inbound,
                whole_call=ctx.whole_call or inner_retry,
                stack=stack,
                keep=() if label in keep else keep,
                keyed=keyed or ctx.keyed,
            )
            target = member
            if isinstance(member, ast.Name) and member.id in self.assigned:
                target = self.assigned[member.id]  # resilient(retry=RETRY), made above
            self.ctx.setdefault(id(target), own)
            if not isinstance(member, ast.Name | ast.Attribute):
                continue
            text = dotted_name(member)
            rule = self.instances.get(text or "") or self.shared_object(self.resolve(member))
            if rule is not None and rule.library in toolkits.LIBRARIES:
                what = f"{rule.library} {_short(member)}{ctx.where}"
                self.toolkit_report(member, rule, own, what, hinted=False)
                self._mark(member)

    def _no_counterpart(self, member: ast.expr, label: str, ctx: toolkits.Ctx) -> bool:
        if label.rstrip("=") in toolkits.NO_COUNTERPART:
            return True
        api = self.toolkit_api(member)
        if api is not None and api.name in toolkits.NO_COUNTERPART:
            return True
        text = dotted_name(member)
        rule = self.instances.get(text or "") if text else None
        kind = api.kind if api is not None else (rule.kind if rule is not None else None)
        if api is not None and api.name == "adaptive_rate_limit":
            return True
        return ctx.inbound is None and kind in (LIMITER, BULKHEAD)

    def _applies_retry(self, node: ast.expr) -> bool:
        """Does this decorator (or stack member) retry what it wraps?"""
        api = self.toolkit_api(node)
        if api is not None and api.kind == RETRY and api.name not in ("RetryBudget",):
            return not (isinstance(node, ast.Call) and self.configured_off(node))
        if api is not None and isinstance(node, ast.Call):
            if api.name == "compose":
                return any(self._applies_retry(a) for a in node.args)
            if api.name in ("resilient", "ResilienceConfig"):
                return any(k.arg == "retry" for k in node.keywords)
        text = dotted_name(node)
        rule = self.instances.get(text or "") if text else None
        if rule is None:
            found = self.rule_for(self.resolve(node.func if isinstance(node, ast.Call) else node))
            rule = found[1] if found else None
        return rule is not None and rule.kind == RETRY and rule.api != "RetryBudget"

    def _preset(self, call: ast.Call, api: toolkits.Api, ctx: toolkits.Ctx) -> None:
        keep = toolkits.preset_keeps(api.name, call)
        stack = (
            f"@resilient(**{api.name}(...))"
            if ctx.where.startswith(" in @")
            else (f"{api.name}(...)")
        )
        for kind, label, extra in toolkits.preset_hints(api.name, call, ctx):
            kept_itself = ctx.inbound is None and kind in (LIMITER, BULKHEAD)
            own = replace(ctx, stack=stack, keep=() if kept_itself else keep)
            rule = Rule(kind, api.library, api.name)
            what = f"{api.library} {_short(call)} (its {label}){ctx.where}"
            self.toolkit_report(call, rule, own, what, extra=extra, hinted=False)
        for k in call.keywords:  # rate_limit=RateLimiterConfig(...): client-side, kept
            if k.arg in ("rate_limit", "fallback", "cache"):
                self.ctx.setdefault(id(k.value), replace(ctx, stack=stack, keep=()))

    def toolkit_report(
        self,
        node: ast.AST,
        rule: Rule,
        ctx: toolkits.Ctx,
        what: str,
        *,
        extra: str = "",
        hinted: bool = True,
    ) -> None:
        if rule.api == "Throttled" and isinstance(node, ast.Call):
            wait = toolkits.number(node, 1, "timeout", None)
            if wait is not None and wait > 0:  # waits for its turn: a client-side throttle
                rule = replace(rule, api="rate_limit")
                ctx = replace(ctx, inbound=None)
        if rule.api == "Limiter":  # throttled-py's FastAPI limiter: on routes
            ctx = replace(ctx, inbound="route")
        if ctx.inbound is None and rule.kind in (LIMITER, BULKHEAD) and self._in_asgi_class():
            ctx = replace(ctx, inbound="middleware")  # guards the requests it serves
        api = toolkits.Api(rule.kind, rule.library, rule.api)
        if (
            hinted
            and isinstance(node, ast.expr)
            and (ctx.inbound is None or kind_has_inbound(rule))
        ):
            extra = toolkits.hint(api, node, ctx)
        if ctx.keep:
            keep = (
                f"keep the {ctx.stack} for {', '.join(ctx.keep)} (no counterpart in "
                "fidelity_mw), without this"
            )
            extra = f"{extra}; {keep}" if extra else keep
        self.report(
            node,
            rule,
            what,
            extra,
            region=ctx.region,
            remedy=self.toolkit_remedy(rule, ctx),
            outbound=ctx.inbound is None,
        )

    def toolkit_remedy(self, rule: Rule, ctx: toolkits.Ctx) -> str:
        kind, name = rule.kind, rule.api
        if name == "ResilientMiddleware":
            return (
                "FidelityMiddleware: rate_limit[] (per client), the route breaker, [deadline] "
                "(its config is not literal here: see where it is made)"
            )
        if name == "RateLimitMiddleware":
            return "FidelityMiddleware sends the RateLimit fields itself (rate_limit_headers)"
        if name == "Throttled" and ctx.inbound is None:
            return (
                "on requests (a key per client): rate_limit[] (rate, burst, key, match); "
                "on calls this process makes (client-side): no counterpart in fidelity_mw, "
                "keep it (# fidelity-mw: ignore marks it out of scope)"
            )
        if name == "adaptive_rate_limit" or (ctx.inbound is None and kind in (LIMITER, BULKHEAD)):
            what = {
                "adaptive_rate_limit": "an adaptive (AIMD) client-side rate limit",
                LIMITER: "a client-side rate limit (on calls this process makes)",
                BULKHEAD: "a client-side bulkhead (on calls this process makes)",
            }
            return (
                f"{what.get(name) or what[kind]}: no counterpart in fidelity_mw, keep it "
                "(# fidelity-mw: ignore marks it out of scope)"
            )
        if ctx.inbound is not None:
            base = toolkits.INBOUND_FIELD.get(kind, toolkits.INBOUND_NONE)
        else:
            client = self.client_library(ctx.region)
            whole = name == "deadline" or (name == "timeout" and ctx.whole_call)
            if name == "TimeoutConfig":
                whole = False  # per_attempt=False is in the hint; the field name is generic
            field_ = toolkits.DEADLINE_FIELD if whole else toolkits.OUTBOUND_FIELD.get(kind, "")
            if kind == RETRY:
                base = RETRY_REMEDY[client]
            elif client == "httpx":
                base = f"{field_} via FidelityTransport"
            elif client is not None:
                base = (
                    f"{client} cannot go through FidelityTransport (httpx only): move the call "
                    f"to httpx with FidelityTransport and {field_}, or keep it and mark it out "
                    "of scope (# fidelity-mw: ignore)"
                )
            else:
                base = (
                    "no httpx call seen: FidelityTransport only owns httpx calls; if this is "
                    f"HTTP, move it to httpx with FidelityTransport and {field_}, otherwise "
                    "keep it (a database, an SDK on another client) and mark it out of scope "
                    "(# fidelity-mw: ignore)"
                )
        if ctx.keyed and ctx.inbound is None:
            base += "; keyed: fidelity_mw keeps one breaker and one budget per host already"
        elif ctx.keyed:
            base += "; keyed: a rate_limit[] counts per key already (key)"
        return base

    def _throttled_limit_hint(
        self, deco: ast.expr, ctx: toolkits.Ctx, creation: ast.Call | None
    ) -> str:
        """`@limiter.limit("5/m")` (or `()`, the Limiter's quota) on a route: the same
        [[rate_limit]], per client with `key_func=get_remote_address`, else global."""
        node = None
        if isinstance(deco, ast.Call):
            node = deco.args[0] if deco.args else None
            node = node or next((k.value for k in deco.keywords if k.arg == "quota"), None)
        key_func = None
        if isinstance(deco, ast.Call):
            key_func = next((k.value for k in deco.keywords if k.arg == "key_func"), None)
        if creation is not None:
            if node is None:
                node = creation.args[0] if creation.args else None
                node = node or next((k.value for k in creation.keywords if k.arg == "quota"), None)
            if key_func is None:
                key_func = next((k.value for k in creation.keywords if k.arg == "key_func"), None)
        found = toolkits.quotas(node)
        if not found:
            return ""
        if key_func is None or (isinstance(key_func, ast.Constant) and key_func.value is None):
            key: str | None = "global"  # its default: one bucket per route for all callers
        elif last_name_of(key_func) == "get_remote_address":
            key = None  # client_ip, the default
        elif (header := _header_key(key_func)) is not None:
            key = f"header:{header}"
        else:
            return ""
        return toolkits.limit_hint(ctx, [(c, p, b) for c, p, b in found], key)

    # ------------------------------------------------------------ visitors

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        route = self.route_path(node)
        decorators = node.decorator_list
        on_route = any(_is_route_decorator(d) for d in decorators)
        for i, deco in enumerate(decorators):
            # the toolkits' decorators, outermost first: a timeout above a retry
            # bounds the whole call, below it each attempt
            self.ctx.setdefault(
                id(deco),
                toolkits.Ctx(
                    where=f" on {node.name}()",
                    region=node,
                    route=route,
                    fn=node.name,
                    inbound="route" if on_route else None,
                    whole_call=any(self._applies_retry(d) for d in decorators[i + 1 :]),
                ),
            )
        for deco in decorators:
            self._decorator(deco, node, route)
        again = recursive_retry(node)
        if again is not None:
            self.report(
                node,
                Rule(RETRY, "hand-written"),
                f"{node.name}() retries by calling itself again (line {again.lineno}) "
                "with its attempt count moved on",
                confidence=MEDIUM,
                remedy=RETRY_REMEDY[self.client_library(node)],
                region=node,
            )
        self.function.append(node)
        for stmt in node.body:
            self.visit(stmt)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.function.pop()

    def _decorator(
        self, deco: ast.expr, fn: ast.FunctionDef | ast.AsyncFunctionDef, route: str | None
    ) -> None:
        target = deco.func if isinstance(deco, ast.Call) else deco
        on = f" on {fn.name}()"
        found = self.rule_for(self.resolve(target))
        api = self.toolkit_api(deco)
        if api is not None and api.kind is None:  # a stack: its concerns are reported
            self.handled.add(id(deco))
            self._mark(target)
            base = self.ctx[id(deco)]
            self._stack(deco, api, replace(base, where=f" in @{_short(target)}{on}"))
        elif found is not None and found[1].library in toolkits.LIBRARIES:
            rule = found[1]
            if not (isinstance(deco, ast.Call) and self.configured_off(deco)):
                what = f"{rule.library} @{_short(deco)}{on}"
                self.toolkit_report(deco, rule, self.ctx[id(deco)], what)
            self._mark(target)
            self.handled.add(id(deco))
        elif found is not None:
            _, rule = found
            if not (isinstance(deco, ast.Call) and self.configured_off(deco)):
                extra = _hint(deco, rule)
                self.report(deco, rule, f"{rule.library} @{_short(deco)}{on}", extra, region=fn)
            self._mark(target)
            self.handled.add(id(deco))
        else:
            inst = self._instance_use(target, decorator=True)
            if inst is not None and inst[0].library in toolkits.LIBRARIES:
                rule, _text = inst
                ctx = self.ctx[id(deco)]
                extra = ""
                if rule.api == "Limiter":  # throttled-py's `@limiter.limit("5/m")`
                    owner = dotted_name(target.value) if isinstance(target, ast.Attribute) else None
                    ctx = replace(ctx, inbound="route")
                    extra = self._throttled_limit_hint(deco, ctx, self.created.get(owner or ""))
                what = f"{rule.library} @{_short(deco)}{on}"
                self.toolkit_report(deco, rule, ctx, what, extra=extra, hinted=False)
                self._mark(target)
                self.handled.add(id(deco))
            elif inst is not None:
                rule, _text = inst
                extra = (
                    _limit_hint(deco, route, fn.name, _route_method(fn), rule.key)
                    if rule.kind == LIMITER
                    else ""
                )
                self.report(deco, rule, f"{rule.library} @{_short(deco)}{on}", extra)
                self._mark(target)
                self.handled.add(id(deco))
        self.visit(deco)

    def _httpx_retry(self, transport: ast.Call) -> ast.Call | None:
        """The `httpx_retries.Retry(...)` a `RetryTransport` is given, made inline or
        bound to a name at module level; none given: `Retry()`, its defaults."""
        given = next((k.value for k in transport.keywords if k.arg == "retry"), None)
        if given is None:
            return ast.Call(func=ast.Name("Retry"), args=[], keywords=[])
        if isinstance(given, ast.Name) and given.id in self.assigned:
            given = self.assigned[given.id]
        made = isinstance(given, ast.Call) and self.resolve(given.func) == "httpx_retries.Retry"
        return given if made and isinstance(given, ast.Call) else None

    def _instance_use(self, target: ast.expr, *, decorator: bool) -> tuple[Rule, str] | None:
        """`limiter.limit(...)` / `@breaker` on an object a library call created."""
        text = dotted_name(target)
        if text is None:
            return None
        # `limiter`, or `limits.limiter` after `import app.limits as limits`: an object
        # another scanned module made
        own = self.instances.get(text) or self.shared_object(self.resolve(target))
        if own is not None:
            return (own, text) if decorator else None
        if isinstance(target, ast.Attribute):
            base = dotted_name(target.value)
            rule = self.instances.get(base) if base else None
            if rule is None:
                rule = self.shared_object(self.resolve(target.value))
            methods = INSTANCE_METHODS[rule.kind] if rule is not None else set()
            if rule is not None and rule.library in toolkits.LIBRARIES:
                methods = TOOLKIT_METHODS
            if rule is not None and (decorator or target.attr in methods):
                return rule, text
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        self._bind(node.targets, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._bind([node.target], node.value)
            self.visit(node.value)
        self.visit(node.target)  # the annotation names a type; it sets up nothing

    def _bind(self, targets: list[ast.expr], value: ast.expr) -> None:
        if not isinstance(value, ast.Call):
            return
        found = self.rule_for(self.resolve(value.func))
        if found is None or self.configured_off(value):
            return
        for target in targets:
            text = dotted_name(target)
            if text:
                self.instances[text] = _with_key(found[1], value)
                self.created[text] = value

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            for arg in node.args[1:]:
                self._mark(arg)  # a type check sets up nothing
        api = self.toolkit_api(node) if id(node) not in self.handled else None
        if api is not None and api.kind is None:
            self._mark(node.func)
            self.handled.add(id(node))
            ctx = self.ctx.get(id(node)) or self._default_ctx(None)
            self._stack(node, api, replace(ctx, where=ctx.where or f" in {_short(node.func)}(...)"))
        elif api is not None:
            self._mark(node.func)
            self.handled.add(id(node))
            rule = Rule(api.kind or RETRY, api.library, api.name)
            if not self.configured_off(node):
                ctx = self.ctx.get(id(node)) or self._default_ctx(None)
                self.toolkit_report(node, rule, ctx, f"{rule.library} {_short(node)}{ctx.where}")
        if id(node) not in self.handled:
            name = self.resolve(node.func)
            found = self.rule_for(name)
            if found is not None and name and name != found[0] and not name.endswith(_FACTORIES):
                self._mark(node.func)  # `Retry.DEFAULT_ALLOWED_METHODS.union(...)`: a constant
            elif found is not None:
                _, rule = found
                if not self.configured_off(node):
                    region = self.function[-1] if self.function else None
                    # `Retrying(...)`, `AsyncRetrying(...)`, `stamina.retry_context(...)` and
                    # a decorator made apart (`api_retry = retry(...)`, the usual way to share
                    # one) take the decorator's arguments
                    configures = rule.library in _HINTED_RETRIES and (name or "").endswith(
                        ("Retrying", ".retry", ".retry_context", ".on_exception", ".on_predicate")
                    )
                    hinted = configures or rule.kind in (BREAKER, LIMITER)
                    extra = _hint(node, rule) if hinted else ""
                    if rule.library == "httpx-retries":
                        retry = self._httpx_retry(node)
                        extra = _httpx_retries_hint(retry) if retry is not None else ""
                    what = f"{rule.library} {_short(node)}"
                    self.report(node, rule, what, extra, region=region)
                self._mark(node.func)
            elif name in KEYWORD_RETRIES:
                self._keyword_retries(node, name)
            elif name in SDK_RETRIES:
                self._sdk_retries(node, name)
            else:
                inst = self._instance_use(node.func, decorator=False)
                if inst is not None and inst[0].library in toolkits.LIBRARIES:
                    rule, _ = inst
                    ctx = self._default_ctx(None)
                    fn = self.function[-1] if self.function else None
                    if fn is not None and any(_is_route_decorator(d) for d in fn.decorator_list):
                        ctx = replace(ctx, inbound="route", fn=fn.name, route=self.route_path(fn))
                    what = f"{rule.library} {_short(node)}"
                    self.toolkit_report(node, rule, ctx, what, hinted=False)
                    self._mark(node.func)
                elif inst is not None:
                    rule, _ = inst
                    self.report(node, rule, f"{rule.library} {_short(node)}")
                    self._mark(node.func)
        self.generic_visit(node)

    def _keyword_retries(self, node: ast.Call, name: str) -> None:
        keyword, library = KEYWORD_RETRIES[name]
        for kw in node.keywords:
            if kw.arg != keyword:
                continue
            value = _literal(kw.value)
            if value == 0 or value is None or value is False:
                return  # retries=0: explicitly no retries
            if (
                isinstance(kw.value, ast.Call) and self.rule_for(self.resolve(kw.value.func))
            ) or dotted_name(kw.value) in self.instances:
                return  # max_retries=Retry(...): reported where the Retry is made
            confidence = HIGH if value is not _NOT_LITERAL else MEDIUM
            self.report(
                node, Rule(RETRY, library), f"{library} {_short(node)}", confidence=confidence
            )
            self._mark(node.func)

    def _sdk_retries(self, node: ast.Call, name: str) -> None:
        """An SDK client that retries by itself: its own retry setting, not a layer to
        replace by upstream[].retry; turned off, FidelityTransport can own the retries."""
        keyword, library, default = SDK_RETRIES[name]
        given = next((kw.value for kw in node.keywords if kw.arg == keyword), None)
        value = _literal(given) if given is not None else default
        if value == 0 or value is False:
            return
        told = "" if given is not None else f" (retries {default} times by default)"
        self.report(
            node,
            Rule(RETRY, library),
            f"{library} client{told} {_short(node)}",
            confidence=HIGH if given is not None else MEDIUM,
            outbound=False,  # to the SDK's own host, not one the module names
            remedy=f"{library}'s own retry setting: set {keyword}=0 and pass "
            "http_client=httpx.Client(transport=FidelitySyncTransport()) (or an AsyncClient "
            "with FidelityTransport) so upstream[].retry decides; never both",
        )
        self._mark(node.func)

    def configured_off(self, call: ast.Call) -> bool:
        """A retry library call whose own settings make it never retry."""
        name = self.resolve(call.func) or ""
        found = self.rule_for(name)
        if found is None:
            return False
        library = found[1].library
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        value = {k: _literal(v) for k, v in kw.items()}
        if library == "urllib3":
            total = value.get("total", _literal(call.args[0]) if call.args else 10)
            if name.endswith(".from_int"):
                return bool(call.args) and _literal(call.args[0]) in (0, False)
            if total == 0 or total is False:
                return True
            return total is None and all(
                value.get(k) in (0, False) for k in ("connect", "read", "status")
            )
        if library == "tenacity":
            stop, retry = kw.get("stop"), kw.get("retry")
            if isinstance(stop, ast.Call) and (self.resolve(stop.func) or "").endswith(
                "stop_after_attempt"
            ):
                return bool(stop.args) and _literal(stop.args[0]) in (0, 1)
            return retry is not None and (self.resolve(retry) or "").endswith("retry_never")
        if library == "backoff":
            return value.get("max_tries") in (0, 1)
        if library == "retrying":
            return value.get("stop_max_attempt_number") in (0, 1)
        if library == "retry":
            return value.get("tries") in (0, 1)
        if library == "aiohttp-retry":
            options = kw.get("retry_options")
            return isinstance(options, ast.Call) and any(
                k.arg == "attempts" and _literal(k.value) in (0, 1) for k in options.keywords
            )
        if library == "stamina":
            return value.get("attempts") in (0, 1)
        if library == toolkits.NOPANIC and found[1].api == "retry":
            return _literal(call.args[0] if call.args else kw.get("attempts")) == 1
        if library == toolkits.PYRESILIENCE and found[1].api == "RetryConfig":
            return _literal(call.args[0] if call.args else kw.get("max_attempts")) == 1
        if library == "httpx-retries":
            retry = kw.get("retry")
            return isinstance(retry, ast.Call) and any(
                k.arg == "total" and _literal(k.value) == 0 for k in retry.keywords
            )
        return False

    def visit_Name(self, node: ast.Name) -> None:
        self._reference(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not self._reference(node):
            self.generic_visit(node)

    def _reference(self, node: ast.Name | ast.Attribute) -> bool:
        """A bare reference such as `app.add_middleware(SlowAPIMiddleware)`."""
        if id(node) in self.handled or not isinstance(node.ctx, ast.Load):
            return False
        name = self.resolve(node)
        found = self.rule_for(name)
        if found is None:
            return False
        if found[0] != name:
            self._mark(node)  # `Retry.DEFAULT_ALLOWED_METHODS`: a constant of the library
            return True
        _, rule = found
        self.report(node, rule, f"{rule.library} {_short(node)}")
        self._mark(node)
        return True

    def visit_For(self, node: ast.For) -> None:
        self._loop(node)
        self.generic_visit(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        self._loop(node)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self._loop(node)
        self.generic_visit(node)

    def _loop(self, node: ast.For | ast.AsyncFor | ast.While) -> None:
        """A hand-written retry loop (see `retryloops` for what counts)."""
        verdict = self.loops.read(node, self._params(), self._is_library_call)
        if verdict is None:
            return
        loop = type(node).__name__.lower().replace("async", "async ")
        where = f" in {self.function[-1].name}()" if self.function else ""
        how = (
            "after catching its failure" if verdict.how == "caught" else "after checking its status"
        )
        attempt_line = getattr(_first_call(verdict.attempt), "lineno", node.lineno)
        wait = (
            f"waits with {_short(verdict.sleep)} (line {verdict.sleep.lineno})"
            if verdict.sleep is not None
            else "no wait between attempts"
        )
        self.report(
            node,
            Rule(RETRY, "hand-written"),
            f"{loop} loop{where} retries a call {how} (line {attempt_line}); {wait}",
            confidence=verdict.confidence,
            remedy=self._loop_remedy(verdict, node),
        )

    def _loop_remedy(self, verdict: LoopVerdict, node: ast.AST) -> str:
        library = self.client_library(node)
        base = RETRY_REMEDY[library]
        if verdict.configurable is None:
            if library != "httpx":
                return base
            hint = _loop_retry_hint(node, verdict.sleep, _first_call(verdict.attempt))
            return "remove the loop; " + base + (f"; e.g. {hint}" if hint else "")
        knob = verdict.configurable
        if library in ("httpx", None):
            return (
                f"a retry setting of this code ({knob}): callers on fidelity_mw set {knob}=0 "
                f"and send through FidelityTransport, where {FIDELITY_RETRY.split(' via')[0]} "
                "decides; never both"
            )
        return f"a retry setting of this code ({knob}): callers on fidelity_mw set {knob}=0; {base}"

    def _params(self) -> set[str]:
        if not self.function:
            return set()
        args = self.function[-1].args
        return {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}

    def _is_library_call(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name | ast.Attribute):
            text = dotted_name(node)  # `retrying = AsyncRetrying(...)`, then `for a in retrying`
            return text in self.instances or self.shared_object(self.resolve(node)) is not None
        return isinstance(node, ast.Call) and (
            self.rule_for(self.resolve(node.func)) is not None
            or self._instance_use(node.func, decorator=False) is not None
        )


def _loop_retry_hint(node: ast.AST, sleep: ast.Call | None, attempt: ast.AST) -> str:
    """`for attempt in range(4)` sleeping `0.25 * 2 ** attempt` (or a constant) after
    each try -> `retry = { attempts = 4, base_ms = 250, max_ms = 1000, jitter = "none" }`:
    the same attempts and the same waits between them. Literal counts and waits only;
    a wait before the try (its first turn waits, or skips the wait) gives no waits."""
    if not isinstance(node, ast.For | ast.AsyncFor) or not isinstance(node.iter, ast.Call):
        return ""
    call = node.iter
    if last_name_of(call.func) != "range" or call.keywords:
        return ""
    bounds = [_literal(a) for a in call.args]
    if not bounds or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        return ""
    ints = [int(b) for b in bounds if isinstance(b, int)]
    start = 0
    if len(ints) == 1:
        attempts = ints[0]
    elif len(ints) == 2 or (len(ints) == 3 and ints[2] == 1):
        start, attempts = ints[0], ints[1] - ints[0]
    else:
        return ""
    if not 1 < attempts <= 10:  # one attempt retries nothing; ten is the policy's cap
        return ""
    parts = [f"attempts = {attempts}"]
    after_the_try = sleep is not None and sleep.lineno > getattr(attempt, "lineno", 0)
    waits = _loop_waits(node.target, sleep) if after_the_try else None
    if waits is not None:
        scale, doubling = waits
        first = scale * 2**start if doubling else scale
        last = first * 2 ** (attempts - 2) if doubling else first
        if first == int(first) and last == int(last) and last <= 600_000:
            parts.append(f'base_ms = {int(first)}, max_ms = {int(last)}, jitter = "none"')
    return f"retry = {{ {', '.join(parts)} }}"


def _loop_waits(target: ast.expr, sleep: ast.Call | None) -> tuple[float, bool] | None:
    """The wait in ms at a counter of 0 and whether it doubles per turn: `sleep(0.5)`,
    `sleep(0.1 * 2 ** n)` (or `2 ** n * 0.1`) with `n` the loop's counter."""
    if sleep is None or len(sleep.args) != 1 or not isinstance(target, ast.Name):
        return None
    wait = sleep.args[0]
    value = _literal(wait)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return value * 1000, False
    if _doubles_with(wait, target.id):  # `sleep(2 ** attempt)`: a second, doubling
        return 1000.0, True
    if isinstance(wait, ast.BinOp) and isinstance(wait.op, ast.Mult):
        for factor, power in ((wait.left, wait.right), (wait.right, wait.left)):
            scale = _literal(factor)
            if (
                isinstance(scale, int | float)
                and not isinstance(scale, bool)
                and scale > 0
                and _doubles_with(power, target.id)
            ):
                return scale * 1000, True
    return None


def _doubles_with(node: ast.expr, counter: str) -> bool:
    """`2 ** counter`."""
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and _literal(node.left) == 2
        and isinstance(node.right, ast.Name)
        and node.right.id == counter
    )


_UNSAFE_METHODS = ("post", "patch")


def _unsafe_method_note(region: ast.AST) -> str:
    """The old code retried a POST (or PATCH) it sends: FidelityTransport does not, unless
    told, so deleting the retry without this would drop those retries silently."""
    for node in ast.walk(region):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        method = node.func.attr.lower()
        if method == "request" and node.args:
            first = _literal(node.args[0])
            method = first.lower() if isinstance(first, str) else ""
        if method in _UNSAFE_METHODS:
            verb = method.upper()
            return (
                f"; it retried a {verb} (line {node.lineno}): FidelityTransport retries one "
                f'only with an Idempotency-Key header, or with methods = [..., "{verb}"] in '
                "[upstream.retry] for an upstream that deduplicates them"
            )
    return ""


def _first_call(node: ast.AST) -> ast.AST:
    if isinstance(node, ast.Call):
        return node
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    return min(calls, key=lambda c: (c.lineno, c.col_offset)) if calls else node


def _walk_own(body: Sequence[ast.stmt]) -> Iterator[ast.AST]:
    """Nodes under `body`, not descending into nested functions, classes or loops."""
    stack: list[ast.AST] = [n for n in reversed(body) if not isinstance(n, _OWN_SCOPES)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(
            child for child in ast.iter_child_nodes(node) if not isinstance(child, _OWN_SCOPES)
        )


_OWN_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.For,
    ast.AsyncFor,
    ast.While,
)


def _own_nodes(body: Sequence[ast.stmt], *types: type) -> Iterator[ast.AST]:
    return (n for n in _walk_own(body) if isinstance(n, types))


_BREAKER_NAME = re.compile(r"breaker", re.IGNORECASE)
_FAILURE_COUNT = re.compile(r"fail|error", re.IGNORECASE)
_CLOCKS = {"time", "monotonic", "perf_counter", "now", "utcnow", "time_ns", "monotonic_ns"}


def _is_route_decorator(deco: ast.expr) -> bool:
    """`@app.get(...)`, `@router.post(...)`, `@app.route(...)`."""
    return (
        isinstance(deco, ast.Call)
        and isinstance(deco.func, ast.Attribute)
        and deco.func.attr in ROUTE_DECORATORS
    )


def kind_has_inbound(rule: Rule) -> bool:
    return rule.kind in toolkits.INBOUND_FIELD


def last_name_of(node: ast.AST) -> str:
    return toolkits.last_name(node)


def _route_method(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The method of `@app.post("/x")` (upper case); None for `@app.route` and the like."""
    for deco in fn.decorator_list:
        if (
            isinstance(deco, ast.Call)
            and isinstance(deco.func, ast.Attribute)
            and deco.func.attr in _METHOD_DECORATORS
        ):
            return deco.func.attr.upper()
    return None


_METHOD_DECORATORS = {"get", "post", "put", "patch", "delete", "head", "options"}


def _route_path(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The path of `@app.get("/x")` / `@router.post("/x")` / `@app.route("/x")`."""
    for deco in fn.decorator_list:
        if (
            isinstance(deco, ast.Call)
            and isinstance(deco.func, ast.Attribute)
            and deco.func.attr in ROUTE_DECORATORS
            and deco.args
        ):
            path = _literal(deco.args[0])
            if isinstance(path, str):
                return path
    return None


def _call_named(node: ast.AST | None, *names: str) -> ast.Call | None:
    """The first call in `node` (an `a | b` of stops included) to a function so named."""
    for sub in ast.walk(node) if node is not None else ():
        if isinstance(sub, ast.Call):
            func = sub.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in names:
                return sub
    return None


def _number(call: ast.Call, position: int, keyword: str, default: float | None) -> float | None:
    """A literal number argument of `call`, by keyword or position; None if not literal."""
    node = next((k.value for k in call.keywords if k.arg == keyword), None)
    if node is None and len(call.args) > position:
        node = call.args[position]
    if node is None:
        return default
    value = _literal(node)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None  # type: ignore[arg-type]


_BY_NAME = 1_000  # a position no call fills: `_number` reads the keyword only


def _ms_value(seconds: float) -> int:
    return round(seconds * 1000)


_MAX_WAIT_MS = 600_000  # the policy's bound on base_ms and max_ms


def _retry_hint(deco: ast.expr, library: str) -> str:
    """`@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.1, max=2))`
    or `@stamina.retry(attempts=3, wait_initial=0.1, wait_max=2)` -> the same
    `[upstream.retry]` (docs/migration.md, "From tenacity and stamina")."""
    if not isinstance(deco, ast.Call):
        return ""
    keys: dict[str, object] = {}
    kw = {k.arg: k.value for k in deco.keywords if k.arg}
    if library == "tenacity":
        stop = _call_named(kw.get("stop"), "stop_after_attempt")
        if stop is not None and (n := _number(stop, 0, "max_attempt_number", None)):
            keys["attempts"] = int(n)
        wait = kw.get("wait")
        fixed = _call_named(wait, "wait_fixed")
        expo = _call_named(wait, "wait_exponential", "wait_random_exponential")
        jittered = _call_named(wait, "wait_exponential_jitter")
        if fixed is not None and (w := _number(fixed, 0, "wait", None)) is not None:
            keys.update(base_ms=_ms_value(w), max_ms=_ms_value(w), jitter="none")
        elif expo is not None or jittered is not None:
            # the same two numbers, under the name each wait gives its first one
            call, first = (expo, "multiplier") if expo is not None else (jittered, "initial")
            assert call is not None
            base, cap = _number(call, 0, first, 1.0), _number(call, 1, "max", None)
            plain = expo is not None and "random" not in ast.unparse(expo.func)
            floor = _number(call, 3, "min", 0.0) if plain else 0.0
            if base is not None and floor is not None:
                # wait_exponential waits max(min, multiplier x 2^n): starting at the
                # larger one, no wait is shorter than tenacity's
                keys["base_ms"] = _ms_value(max(base, floor))
            if cap is not None:
                keys["max_ms"] = _ms_value(cap)
            keys["jitter"] = "none" if plain else "full"
        # a decorator of httpx's transport errors alone never saw a 5xx (it reaches it
        # as `raise_for_status()`'s HTTPStatusError); the transport retries 502/503/504
        # unless told not to
        keys.update(retryon.keys(retryon.tenacity_condition(kw.get("retry"))))
    elif library == "retrying":  # its waits are in milliseconds
        tries = _number(deco, _BY_NAME, "stop_max_attempt_number", None)
        if tries is not None:
            keys["attempts"] = int(tries)
        fixed_ms = _number(deco, _BY_NAME, "wait_fixed", None)
        multiplier = _number(deco, _BY_NAME, "wait_exponential_multiplier", None)
        if fixed_ms is not None:
            keys.update(base_ms=round(fixed_ms), max_ms=round(fixed_ms), jitter="none")
        elif multiplier is not None:
            # it waits multiplier x 2^attempt, from attempt 1: the first wait is twice it
            keys["base_ms"] = round(2 * multiplier)
            cap_ms = _number(deco, _BY_NAME, "wait_exponential_max", None)
            if cap_ms is not None:
                keys["max_ms"] = round(cap_ms)
            keys["jitter"] = "none"
    elif library == "retry":
        tries = _number(deco, 1, "tries", None)
        if tries is not None and tries > 0:
            keys["attempts"] = int(tries)
        delay, factor = _number(deco, 2, "delay", None), _number(deco, 4, "backoff", 1.0)
        ceiling = _number(deco, 3, "max_delay", None)
        spread = any(k.arg == "jitter" for k in deco.keywords) or len(deco.args) > 5
        if delay is not None and factor in (1.0, 2.0) and not spread:
            # delay, then delay x backoff each time: fixed at 1, doubling at 2
            keys["base_ms"] = _ms_value(delay)
            if factor == 1.0:
                keys["max_ms"] = _ms_value(delay)
            elif ceiling is not None:
                keys["max_ms"] = _ms_value(ceiling)
            keys["jitter"] = "none"
    elif library == "stamina":
        attempts = next((k.value for k in deco.keywords if k.arg == "attempts"), None)
        count = _literal(attempts) if attempts is not None else 10  # stamina's default
        if isinstance(count, int) and not isinstance(count, bool):
            keys["attempts"] = count
        for arg, key, default in (("wait_initial", "base_ms", 0.1), ("wait_max", "max_ms", 5.0)):
            node = kw.get(arg)
            value = default if node is None else _literal(node)  # stamina's defaults
            if isinstance(value, int | float) and not isinstance(value, bool):
                keys[key] = _ms_value(float(value))
        initial, most = keys.get("base_ms"), keys.get("max_ms")
        if isinstance(initial, int) and isinstance(most, int) and initial > most:
            keys["base_ms"] = most  # stamina caps every wait at wait_max, the first too
        keys["jitter"] = "full"
        keys.update(retryon.keys(retryon.exceptions(kw.get("on"))))
    elif library == "backoff":
        keys.update(_backoff_keys(deco))
    if not keys:
        return ""
    attempts_n, base_ms, max_ms = keys.get("attempts"), keys.get("base_ms"), keys.get("max_ms")
    if isinstance(attempts_n, int):
        keys["attempts"] = max(1, min(10, attempts_n))  # the policy's range
    if isinstance(base_ms, int):
        # (a negative wait, e.g. stamina's wait_initial=-1, is no wait: the policy's range
        # starts at 0, and a table printed with -1000 did not load)
        base_ms = keys["base_ms"] = max(0, min(base_ms, _MAX_WAIT_MS))
        if max_ms is None:
            # no cap: the waits grow to the last retry's (the policy's default max_ms,
            # 2 s, would cut them short, or refuse a base above it)
            count = keys.get("attempts", 3)
            retries = count - 2 if isinstance(count, int) else 1
            max_ms = base_ms * 2 ** max(0, retries)
    if isinstance(base_ms, int) and isinstance(max_ms, int):
        keys["max_ms"] = min(max(base_ms, max_ms), _MAX_WAIT_MS)  # not below base_ms
    elif isinstance(max_ms, int):
        keys["max_ms"] = max(0, min(max_ms, _MAX_WAIT_MS))
    return _retry_table(keys)


_RETRY_KEYS = (
    "attempts", "base_ms", "max_ms", "jitter", "on_status", "on_429", "on_connect_error",
    "on_read_timeout",
)  # fmt: skip


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _retry_table(keys: dict[str, object]) -> str:
    body = ", ".join(f"{k} = {_toml_value(keys[k])}" for k in _RETRY_KEYS if k in keys)
    return f"e.g. retry = {{ {body} }}"


def _backoff_keys(deco: ast.Call) -> dict[str, object]:
    """`@backoff.on_exception(backoff.expo, httpx.TransportError, max_tries=4, factor=0.5,
    max_value=8)` (or `backoff.constant, interval=2`; `@backoff.on_predicate(wait_gen,
    lambda r: r.status_code == 503, ...)`): backoff waits `factor x base^n` from n = 0,
    `base` 2, each drawn in [0, wait] unless `jitter=None` (docs/migration.md, "From
    tenacity and stamina", backoff's rows)."""
    keys: dict[str, object] = {}
    kw = {k.arg: k.value for k in deco.keywords if k.arg}
    tries = _number(deco, _BY_NAME, "max_tries", None)
    if tries is not None and tries >= 1:
        keys["attempts"] = int(tries)
    wait = last_name_of(deco.args[0]) if deco.args else last_name_of(kw.get("wait_gen", deco))
    if wait == "expo":
        factor = _number(deco, _BY_NAME, "factor", 1.0)
        cap = _number(deco, _BY_NAME, "max_value", None)
        if _number(deco, _BY_NAME, "base", 2.0) == 2.0 and factor is not None and factor > 0:
            keys["base_ms"] = _ms_value(factor)
            if cap is not None:
                keys["max_ms"] = _ms_value(cap)
    elif wait == "constant":
        interval = _number(deco, _BY_NAME, "interval", 1.0)
        if interval is not None and interval >= 0:
            keys["base_ms"] = keys["max_ms"] = _ms_value(interval)
    if "base_ms" in keys:
        jitter = kw.get("jitter")
        if jitter is None or last_name_of(jitter) == "full_jitter":
            keys["jitter"] = "full"  # backoff's default, full_jitter: uniform(0, wait)
        elif isinstance(jitter, ast.Constant) and jitter.value is None:
            keys["jitter"] = "none"
        else:  # random_jitter adds up to 1 s over the wait; another is the app's
            del keys["base_ms"]
            keys.pop("max_ms", None)
    if "giveup" in kw:  # it gives some failures up by a test of its own: not said
        return keys
    if last_name_of(deco.func) == "on_exception":
        given = deco.args[1] if len(deco.args) > 1 else kw.get("exception")
        keys.update(retryon.keys(retryon.exceptions(given)))
    else:  # on_predicate: retries a result its predicate holds for, never an error
        given = deco.args[1] if len(deco.args) > 1 else kw.get("predicate")
        statuses = retryon.predicate_statuses(given)
        if statuses is not None:
            keys.update(retryon.keys(retryon.RetriedOn(retryon.NONE, statuses)))
    return keys


def _httpx_retries_hint(retry: ast.Call) -> str:
    """`RetryTransport(retry=Retry(total=5, backoff_factor=0.5, status_forcelist=[...]))`
    -> the same `[upstream.retry]` (docs/migration.md, "From httpx-retries")."""
    keys: dict[str, object] = {}
    total = _number(retry, 0, "total", 10.0)  # httpx-retries' defaults
    if total is not None and total >= 0:
        keys["attempts"] = max(1, min(10, int(total) + 1))  # it counts retries
    factor = _number(retry, _BY_NAME, "backoff_factor", 0.0)
    most = _number(retry, _BY_NAME, "max_backoff_wait", 120.0)
    spread = _number(retry, _BY_NAME, "backoff_jitter", 1.0)
    attempts = keys.get("attempts")
    if factor == 0.0:  # its default: no wait between attempts
        keys.update(base_ms=0, max_ms=0, jitter="none")
    elif (
        factor is not None and factor > 0 and most is not None and most > 0 and spread in (0.0, 1.0)
    ):
        # (a negative factor or cap is httpx-retries' ValueError: no waits to translate;
        # printed, base_ms = -2000 made a table the policy refuses)
        # it waits factor x 2^n from its first retry on, n = 1: twice ours
        base = min(_ms_value(2 * factor), _MAX_WAIT_MS)
        keys["base_ms"] = base
        # the longest wait its retries reach, under its cap
        last = base * 2 ** max(0, attempts - 2) if isinstance(attempts, int) else base
        keys["max_ms"] = min(max(base, min(last, _ms_value(most))), _MAX_WAIT_MS)
        keys["jitter"] = "full" if spread == 1.0 else "none"
    forcelist = next((k.value for k in retry.keywords if k.arg == "status_forcelist"), None)
    statuses = _literal(forcelist) if forcelist is not None else [429, 502, 503, 504]
    if isinstance(statuses, list | tuple | set | frozenset) and all(
        type(s) is int and 100 <= s <= 599 for s in statuses
    ):
        keys["on_status"] = sorted(set(statuses) - {429})
        keys["on_429"] = 429 in statuses
    return _retry_table(keys)


# library -> (its consecutive-failure argument, its open-time argument, their defaults)
_BREAKER_ARGS = {
    "pybreaker": ("fail_max", "reset_timeout", 5, 60.0),
    "aiobreaker": ("fail_max", "timeout_duration", 5, 60.0),
    "circuitbreaker": ("failure_threshold", "recovery_timeout", 5, 30.0),
    # its factory's defaults for every circuit it makes (`get_breaker` may set its own)
    "purgatory": ("default_threshold", "default_ttl", 5, 30.0),
}


def _seconds(node: ast.expr | None, default: float) -> float | None:
    """A literal number of seconds, or `timedelta(seconds=..., minutes=...)`."""
    if node is None:
        return default
    if isinstance(node, ast.Call) and _call_named(node, "timedelta") is node:
        units = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0, "milliseconds": 0.001}
        total = 0.0
        for k in node.keywords:
            value = _literal(k.value)
            if k.arg not in units or not isinstance(value, int | float):
                return None
            total += float(value) * units[k.arg]
        return total if not node.args else None
    value = _literal(node)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None  # type: ignore[arg-type]


def _breaker_hint(call: ast.expr, library: str) -> str:
    """`pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)` (or circuitbreaker's,
    aiobreaker's, purgatory's factory) -> the `breaker` table that opens and waits the
    same way."""
    if library not in _BREAKER_ARGS:
        return ""
    fails_arg, open_arg, fails_default, open_default = _BREAKER_ARGS[library]
    kw = {k.arg: k.value for k in call.keywords if k.arg} if isinstance(call, ast.Call) else {}
    if isinstance(call, ast.Call):  # all four take these two first, in this order
        kw.update(zip((fails_arg, open_arg), call.args[:2], strict=False))
    fails = _literal(kw[fails_arg]) if fails_arg in kw else fails_default
    open_s = _seconds(kw.get(open_arg), open_default)
    parts: list[str] = []
    if isinstance(fails, int) and not isinstance(fails, bool) and fails >= 1:
        fields: dict[str, object] = {}
        toolkits.consecutive(fields, fails)
        parts.extend(f"{key} = {value}" for key, value in fields.items())
    if open_s is not None and open_s >= 0.001:
        # the policy's longest open time, as toolkits.breaker_open caps it: a longer one
        # printed as written made a table the policy refuses
        open_s = min(open_s, 86_400.0)
        # their open time is exact: no doubling, no jitter (ours is ±20 % by default)
        parts.append(f"open_s = {open_s:g}, open_min_s = {open_s:g}, open_jitter = 0")
    # a breaker library never retried: the transport does by default, so the user who
    # wants the old behaviour must say so, or the migration adds retries silently
    no_retry = (
        f"outbound, {library} never retried the call: retry = {{ attempts = 1 }} keeps it "
        "so (FidelityTransport retries idempotent calls by default)"
    )
    if not parts:
        return no_retry
    return f"e.g. breaker = {{ {', '.join(parts)}, half_open_probes = 1 }}; {no_retry}"


# the limits library's calendar units, in the days it counts them as
_CALENDAR = re.compile(r"^(\d+)\s*(?:/|\s+per\s+)\s*(\d*)\s*(month|year)s?$", re.IGNORECASE)
_CALENDAR_DAYS: Final = {"month": 30, "year": 360}


def _slowapi_rates(text: str) -> list[str]:
    """slowapi's "5/minute;1000/month" -> ["5/minute", "1000/30d"]: one rate per limit,
    a month or a year written as the days slowapi counted (ours has no such unit, so a
    table that kept "1000/month" did not load)."""
    rates = []
    for rate in (r.strip() for r in re.split(r"[;,|]", text)):
        m = _CALENDAR.match(rate)
        if m:
            days = _CALENDAR_DAYS[m.group(3).lower()] * int(m.group(2) or 1)
            rate = f"{m.group(1)}/{days}d" if days <= 365 else rate
        if rate:
            rates.append(rate)
    return rates


def _slowapi_limiter_hint(call: ast.expr) -> str:
    """`Limiter(default_limits=[...], application_limits=[...])`: slowapi counts a
    default limit per route and an application limit over all routes together."""
    if not isinstance(call, ast.Call):
        return ""
    kw = {k.arg: _literal(k.value) for k in call.keywords if k.arg}
    hints = []
    defaults = kw.get("default_limits")
    if isinstance(defaults, list | tuple) and all(isinstance(d, str) for d in defaults):
        rates = [r for d in defaults for r in _slowapi_rates(d)]
        deps = ", ".join(f'Depends(fidelity.limit("{r}"))' for r in rates)
        if deps:
            hints.append(
                f"default_limits count per route: {deps} on the router of the routes "
                "without a limit of their own (slowapi applies a route's own limits "
                'instead) (docs/migration.md, "From slowapi")'
            )
    apps = kw.get("application_limits")
    if isinstance(apps, list | tuple) and all(isinstance(a, str) for a in apps):
        rates = [r for a in apps for r in _slowapi_rates(a)]
        tables = [
            f'{{ name = "application{"" if i == 0 else f"-{i + 1}"}", match = "*", rate = "{r}" }}'
            for i, r in enumerate(rates)
        ]
        if tables:
            hints.append("application_limits: e.g. " + ", ".join(tables))
    key = _with_key(Rule(LIMITER, "slowapi"), call).key
    if hints and key.startswith("header:"):
        header = key.removeprefix("header:")
        hints.append(
            f'its key_func reads {header}: key = "{key}" on these tables, '
            f'fidelity.limit(..., key=lambda request: request.headers.get("{header}"))'
        )
    elif hints and key.startswith("fn:"):
        hints.append(
            f"its key_func {key.removeprefix('fn:')}: fidelity.limit(..., key=fn) or "
            "RateLimit(key=fn) in Python, or these limits count per client IP"
        )
    return "; ".join(hints)


_HINTED_RETRIES = ("tenacity", "stamina", "retrying", "retry", "backoff")


def _hint(node: ast.expr, rule: Rule) -> str:
    if rule.kind == RETRY:
        return _retry_hint(node, rule.library)
    if rule.kind == BREAKER:
        return _breaker_hint(node, rule.library)
    if rule.kind == LIMITER and rule.library == "slowapi":
        return _slowapi_limiter_hint(node)
    return ""


_ROUTE_PARAM = re.compile(r"\{[^{}/]*\}")


def _header_key(func: ast.expr | None) -> str | None:
    """`key_func=lambda request: request.headers.get("x-api-key", ...)` (or `[...]`):
    the header it keys on, for `key = "header:NAME"`."""
    if not isinstance(func, ast.Lambda):
        return None
    body = func.body
    if isinstance(body, ast.Call) and isinstance(body.func, ast.Attribute):
        if body.func.attr != "get" or not body.args:
            return None
        target, arg = body.func.value, body.args[0]
    elif isinstance(body, ast.Subscript):
        target, arg = body.value, body.slice
    else:
        return None
    is_headers = isinstance(target, ast.Attribute) and target.attr == "headers"
    value = _literal(arg)
    return value if is_headers and isinstance(value, str) and value else None


def _with_key(rule: Rule, call: ast.Call) -> Rule:
    """A slowapi Limiter's rule, with the key its key_func counts by."""
    if rule.library != "slowapi" or last_name_of(call.func) != "Limiter":
        return rule
    func = next((k.value for k in call.keywords if k.arg == "key_func"), None)
    if func is None or last_name_of(func) in ("get_remote_address", "get_ipaddr"):
        return rule
    header = _header_key(func)
    name = dotted_name(func) if isinstance(func, ast.Name | ast.Attribute) else None
    return replace(rule, key=f"header:{header}" if header else f"fn:{name or 'a function'}")


def _limit_hint(
    deco: ast.expr, route: str | None, name: str, method: str | None = None, key_of: str = ""
) -> str:
    """`@limiter.limit("5/minute")` on `@app.get("/search")` -> a ready [[rate_limit]].

    One table per rate ("5/minute;100/hour" is two limits), each named after the
    function (names must be unique), matching the route's path: its template's
    parameters ("/items/{item_id}") become "*", since `match` globs the request path.
    slowapi counts the decorated endpoint only: on a route of another method than GET
    the table says `methods`, so a GET of the same path is not counted with it."""
    if isinstance(deco, ast.Attribute) and deco.attr == "exempt":
        path = _ROUTE_PARAM.sub("*", route) if route else None
        exclude = f'exclude = ["{path}"]' if path else "exclude = [its path]"
        return (
            f"{exclude} on each [[rate_limit]] whose match covers it, and keep it off "
            "the router that carries default_limits' Depends(fidelity.limit(...)) "
            '(docs/migration.md, "From slowapi")'
        )
    if not isinstance(deco, ast.Call) or not deco.args:
        return ""
    text = _literal(deco.args[0])
    if not isinstance(text, str):
        return ""
    rates = _slowapi_rates(text)
    match = f'match = "{_ROUTE_PARAM.sub("*", route)}", ' if route else ""
    own_key = next((k.value for k in deco.keywords if k.arg == "key_func"), None)
    header = _header_key(own_key)
    notes = []
    if own_key is None and key_of.startswith("header:"):
        header = key_of.removeprefix("header:")  # the Limiter's key_func
    elif own_key is None and key_of.startswith("fn:"):
        notes.append(
            f"the Limiter's key_func {key_of.removeprefix('fn:')} has no policy form: "
            'key = "header:NAME" if it reads one header, else RateLimit(key=fn) in Python'
        )
    key = f', key = "header:{header}"' if header else ""
    if method is not None and method != "GET":
        key += f', methods = ["{method}"]'
    cost = next((k.value for k in deco.keywords if k.arg == "cost"), None)
    units = _literal(cost)
    if isinstance(units, int) and not isinstance(units, bool):
        key += f", cost = {units}"  # each request counts as many, as slowapi charged it
    elif cost is not None:
        notes.append("its cost function: RateLimit(cost=fn) in Python, or fidelity.limit(cost=fn)")
    tables = [
        f'{{ name = "{name if i == 0 else f"{name}-{i + 1}"}", {match}rate = "{rate}"{key} }}'
        for i, rate in enumerate(rates)
    ]
    if not tables:
        return ""
    return "; ".join(["e.g. " + ", ".join(tables), *notes])


def parse_fail_on(text: str) -> frozenset[str]:
    """'retry,breaker' -> {'retry', 'breaker'}; 'any' -> all kinds. Raises ValueError."""
    kinds: set[str] = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if part == "any":
            kinds.update(KINDS)
        elif part in KINDS:
            kinds.add(part)
        elif part:
            raise ValueError(f"{part!r} is not a kind: use {', '.join(KINDS)} or any")
    if not kinds:
        raise ValueError(f"no kinds given: use {', '.join(KINDS)} or any")
    return frozenset(kinds)


def render_text(report: AuditReport) -> str:
    out = [str(f) for f in report.findings]
    for file, error in report.skipped:
        out.append(f"{file}: skipped, not scanned ({error})")
    for file in report.not_python:
        out.append(f"{file}: not a Python file, not scanned")
    counts = report.summary_counts()
    files = len({f.file for f in report.findings})
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    line = (
        f"{len(report.findings)} finding(s) ({summary}) in {files} file(s); "
        f"{report.scanned} file(s) scanned"
    )
    if report.skipped:
        # In the summary too: a reader (or a CI log) that sees only the last line must not
        # take a partial scan for a whole one.
        line += f", {len(report.skipped)} skipped (not read)"
    if report.not_python:
        line += f", {len(report.not_python)} not Python"
    out.append(line)
    return "\n".join(out) + "\n"
