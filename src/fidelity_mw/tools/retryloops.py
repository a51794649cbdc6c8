"""Hand-written retry loops, recognised by what they do rather than by one shape.

A loop is a retry loop when each turn makes the same call again after the
previous call failed, and a success ends the loop. Failure is seen one of two
ways:

- caught: a `try` around the call whose `except` lets the loop go round again
  (it does not end in `raise`/`return`/`break`), while success leaves the loop
  (`return` or `break` after the call, in `else:`, after the `try`, or a flag
  the `while` tests);
- checked: the call's result is assigned and an `if` tests its status
  (`status_code`, `ok`, a 4xx/5xx number, a `should_retry(...)` helper), with
  an exit out of the loop somewhere.

"The same call" rules out loops that walk data: `for fmt in formats: try:
return parse(s, fmt)` tries a different thing each turn, and so do failover
across hosts (also through an index computed from the item), pagination and
a path walked upwards (`current = current.parent`). An attempt number passed
along does not make a different call. A handler that only catches data
errors (`ValueError`, `KeyError`...), a full or empty queue or a socket not
ready yet (`BlockingIOError`, `SSLWantReadError`...) is not retrying, and
neither is a loop that only waits for a lock or an event.

The sleep is not required (immediate retries are retries), but raises the
confidence. It may be anywhere in the loop: in the `except`, after the
`try`, or in a helper (`self._backoff()`, a function of the module that
sleeps).
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

Loop = ast.For | ast.AsyncFor | ast.While

HIGH, MEDIUM, LOW = "high", "medium", "low"

# Exceptions that say "the input is bad", not "try again later".
_DATA_ERRORS = {
    "ValueError",
    "KeyError",
    "IndexError",
    "TypeError",
    "AttributeError",
    "StopIteration",
    "StopAsyncIteration",
    "LookupError",
    "UnicodeError",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "JSONDecodeError",
    "FileNotFoundError",
    "NotADirectoryError",
    "IsADirectoryError",
    "ImportError",
    "ModuleNotFoundError",
    "NameError",
    "AssertionError",
    "ZeroDivisionError",
    "ArithmeticError",
    "OverflowError",
    "RecursionError",
    "KeyboardInterrupt",
    "GeneratorExit",
    "SystemExit",
    "CancelledError",
    "InvalidOperation",
    "ValidationError",
    "ParseError",
    "ParserError",
    "DecodeError",
    "FileExistsError",
    "PermissionError",
    # flow control: a full or empty queue is waited out, not retried
    "Full",
    "Empty",
    "QueueFull",
    "QueueEmpty",
    # non-blocking I/O: the operation is tried again once the socket is ready
    "BlockingIOError",
    "InterruptedError",
    "WouldBlock",
    "SSLWantReadError",
    "SSLWantWriteError",
    "WantReadError",
    "WantWriteError",
}


def _data_error(name: str) -> bool:
    """An error that says the input is bad (`InvalidResponse`, `InvalidURL` and the
    like, by name): a prompt asking again is not a retry."""
    return name in _DATA_ERRORS or (name.startswith("Invalid") and name != "Invalid")


# Calls that wait for a lock, an event or a thread: looping on them is waiting.
_WAITS = {"acquire", "wait", "join", "wait_for"}
_BUILTINS = frozenset(dir(builtins))
_CATCH_ALL = {"Exception", "BaseException"}
_TRANSIENT = re.compile(
    r"connect|timeout|timedout|transport|network|socket|http|request|response|"
    r"unavailable|throttl|ratelimit|rate_limit|toomany|transient|temporar|retr|"
    r"server|api|service|oserror|ioerror|protocol|remote|broken|reset|busy|deadlock|"
    r"operational|interface|database|lock|conflict|redis|grpc|rpc|sdk|client|aborted",
    re.IGNORECASE,
)
_NETWORK_CALLS = {
    "get",
    "post",
    "put",
    "patch",
    "delete",
    "head",
    "options",
    "request",
    "send",
    "urlopen",
    "fetch",
    "connect",
    "call",
    "invoke",
    "execute",
    "open_connection",
    "stream",
    "query",
    "publish",
    "upload",
    "download",
    "getresponse",
    "recv",
    "sendall",
    "perform",
}
# words that name a request in a longer method name (`_send_request`, `make_api_call`)
_NETWORK_WORDS = {"send", "request", "fetch", "urlopen", "connect", "invoke", "execute", "api"}
_STATUS_ATTRS = {"status_code", "status", "code", "status_int"}
_STATUS_FLAGS = {"ok", "is_success", "is_error", "is_server_error", "is_client_error"}
_COUNTERS = {"range", "count", "repeat", "itertools.count", "itertools.repeat"}
_CONFIG_NAME = re.compile(
    r"^_*(max_?)?(num_?)?(retries|retry|attempts|tries|retry_?count|retry_?limit|"
    r"max_?retry_?attempts|retry_?attempts|max_?attempts|max_?tries|max_?retries)$",
    re.IGNORECASE,
)
_ATTEMPT_NAME = re.compile(r"attempt|retr|tries|^try|^n?try_|round", re.IGNORECASE)
_SLEEPY = re.compile(r"sleep|backoff|back_off", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LoopVerdict:
    how: str  # "caught" or "checked"
    attempt: ast.AST  # the call (or the try around it) that is repeated
    sleep: ast.Call | None
    confidence: str
    configurable: str | None  # the parameter or attribute that sets the retry count


class LoopReader:
    """Reads loops of one module. `resolve` gives a call's qualified name through the
    module's imports; `sleepers` names the module's functions that sleep."""

    def __init__(self, resolve: Callable[[ast.expr], str | None], sleepers: set[str]) -> None:
        self.resolve = resolve
        self.sleepers = sleepers

    # ------------------------------------------------------------ the verdict

    def read(
        self, loop: Loop, params: set[str], handled: Callable[[ast.AST], bool]
    ) -> LoopVerdict | None:
        if isinstance(loop, ast.For | ast.AsyncFor) and handled(loop.iter):
            return None  # `for attempt in Retrying(...)`: the library finding covers it
        if isinstance(loop, ast.For | ast.AsyncFor) and not (
            _is_counter(loop.iter, self.resolve) or self._unused_target(loop)
        ):
            return None  # walks data: each turn works on a different item
        body = loop.body
        caught = self._caught(loop, body)
        checked = None if caught else self._checked(loop, body)
        found = caught or checked
        if found is None:
            return None
        how, attempt, transient = found
        sleeps = [c for c in _calls(body) if self.is_sleep(c)]
        # name the call that waits (`anyio.sleep(...)`) over one that computes the delay
        sleep = next((c for c in sleeps if "sleep" in ast.unparse(c.func).lower()), None)
        sleep = sleep or next(iter(sleeps), None)
        bounded = self._bounded(loop)
        network = transient or self._network(attempt)
        if (sleep is not None or bounded) and network:
            confidence = HIGH
        elif sleep is not None or bounded or network:
            confidence = MEDIUM
        else:
            confidence = LOW
        return LoopVerdict(how, attempt, sleep, confidence, self._configurable(loop, params))

    # ------------------------------------------------------------ failure caught

    def _caught(self, loop: Loop, body: Sequence[ast.stmt]) -> tuple[str, ast.AST, bool] | None:
        for index, stmt in _own_tries(body):
            calls = [c for c in _calls(stmt.body) if not self.is_sleep(c)]
            if all(
                _last_name(c.func) in _WAITS
                for c in calls
                if not (isinstance(c.func, ast.Name) and c.func.id in _BUILTINS)
            ):
                continue  # waiting for a lock or an event, with a timeout per turn
            if not calls or not self._same_call_each_turn(loop, calls):
                continue
            repeating = [h for h in stmt.handlers if self._repeats(h, body, index)]
            if not repeating:
                continue
            kinds = [_caught_names(h) for h in repeating]
            if all(names and all(map(_data_error, names)) for names in kinds):
                continue  # input validation: a different outcome needs different input
            if not self._success_leaves(loop, stmt, body, index):
                continue
            transient = any(_TRANSIENT.search(n) for names in kinds for n in names - _CATCH_ALL)
            return "caught", stmt, transient
        return None

    def _repeats(self, handler: ast.ExceptHandler, body: Sequence[ast.stmt], index: int) -> bool:
        """The loop goes round again after this handler (on at least one path)."""
        outcomes = _outcomes(handler.body)
        if "continue" in outcomes:
            return True
        # falling through: the statements after the try must not all leave
        return "fall" in outcomes and not _always_exits(body[index + 1 :])

    def _success_leaves(
        self, loop: Loop, stmt: ast.Try | ast.TryStar, body: Sequence[ast.stmt], index: int
    ) -> bool:
        # the try may raise on purpose (a bad status turned into an error), but its
        # normal end must leave; or, falling out of it, what follows must leave
        tried = _outcomes([*stmt.body, *stmt.orelse])
        if "leave" in tried and "fall" not in tried:
            return True
        if "leave" in tried and any(
            isinstance(n, ast.If)
            and _always_exits(n.body, leave_only=True)
            and (_retry_named(n.test) or _polarity(n.test) == "good")
            for n in _walk_own([*stmt.body, *stmt.orelse])
        ):
            return True  # `if not retry_wanted: return resp`
        after = _outcomes(body[index + 1 :])
        if "fall" in tried and "leave" in after and "fall" not in after:
            return True
        if isinstance(loop, ast.While):
            # `while not done:` with `done = True` after the call
            tested = {dotted_name(n) for n in ast.walk(loop.test)} - {None, "self", "cls"}
            if tested & _assigned_names([*stmt.body, *stmt.orelse]):
                return True
        return False

    # ------------------------------------------------------------ status checked

    def _checked(self, loop: Loop, body: Sequence[ast.stmt]) -> tuple[str, ast.AST, bool] | None:
        results: dict[str, ast.Call] = {}
        for node in _walk_own(body):
            if isinstance(node, ast.With | ast.AsyncWith):
                # `async with session.post(url) as resp:`
                for item in node.items:
                    call = _unawait(item.context_expr)
                    if isinstance(call, ast.Call) and isinstance(item.optional_vars, ast.Name):
                        results[item.optional_vars.id] = call
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                call = _unawait(node.value)
                if isinstance(call, ast.Call) and not self.is_sleep(call):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        # `response, entry = send(...)`: the first item is the response
                        if isinstance(target, ast.Tuple | ast.List) and target.elts:
                            target = target.elts[0]
                        if isinstance(target, ast.Name):
                            results[target.id] = call
        if not results:
            return None
        if isinstance(loop, ast.While):
            name = _status_subject(loop.test, set(results))
            if name is not None and _polarity(loop.test) == "bad":
                return "checked", results[name], True
        if not any(isinstance(n, ast.Return | ast.Break) for n in _walk_own(body)):
            return None
        for node in _walk_own(body):
            for test, branch in _branches(node):
                name = _status_subject(test, set(results))
                if name is None or not self._same_call_each_turn(loop, [results[name]]):
                    continue
                polarity = _polarity(test)
                # a bad status that goes round again, or a good one that leaves
                if (polarity == "bad" and not _always_exits(branch)) or (
                    polarity == "good" and _always_exits(branch, leave_only=True)
                ):
                    return "checked", results[name], True
        return None

    # ------------------------------------------------------------ signals

    def _same_call_each_turn(self, loop: Loop, calls: list[ast.Call]) -> bool:
        """False for loops that try a different thing each turn (formats, hosts, items)."""
        used = {d for c in calls for n in ast.walk(c) if (d := dotted_name(n))}
        if {w for w in _walking(loop) & used if not _ATTEMPT_NAME.search(w)}:
            return False  # `current = current.parent`: a different thing each turn
        if isinstance(loop, ast.While):
            return True
        targets = _derived(loop, {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)})
        # an attempt number passed along still makes the same request; a page number,
        # an item, a host or a format does not
        return not {t for t in targets & used if not _ATTEMPT_NAME.search(t)}

    def _unused_target(self, loop: ast.For | ast.AsyncFor) -> bool:
        """`for _ in ...`, `for delay in (1, 2, 4)`: the item is not what the call works on."""
        targets = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
        if all(t == "_" or _ATTEMPT_NAME.search(t) for t in targets):
            return True
        used = {
            n.id
            for stmt in loop.body
            for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        sleeps = {
            n.id
            for c in _calls(loop.body)
            if self.is_sleep(c)
            for n in ast.walk(c)
            if isinstance(n, ast.Name)
        }
        return not (targets & (used - sleeps))

    def _bounded(self, loop: Loop) -> bool:
        if isinstance(loop, ast.For | ast.AsyncFor):
            return True
        test = loop.test
        return not (isinstance(test, ast.Constant) and test.value)

    def _network(self, attempt: ast.AST) -> bool:
        for node in ast.walk(attempt):
            if isinstance(node, ast.Await):
                return True
            if isinstance(node, ast.Call):
                name = self.resolve(node.func) or ""
                if name.startswith(("httpx.", "requests.", "urllib3.", "aiohttp.", "socket.")):
                    return True
                last = (_last_name(node.func) or "").strip("_").lower()
                if last in _NETWORK_CALLS or _NETWORK_WORDS & set(last.split("_")):
                    return True
        return False

    def _configurable(self, loop: Loop, params: set[str]) -> str | None:
        bound = loop.iter if isinstance(loop, ast.For | ast.AsyncFor) else loop.test
        compares = [n for n in _walk_own(loop.body) if isinstance(n, ast.Compare)]
        for node in [n for b in (bound, *compares) for n in ast.walk(b)]:
            name = None
            if isinstance(node, ast.Name) and node.id in params:
                name = node.id
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls", "config", "options", "settings")
            ):
                name = node.attr
            if name and _CONFIG_NAME.match(name):
                return name
        return None

    def is_sleep(self, call: ast.Call) -> bool:
        """`time.sleep`, `asyncio.sleep`, anything named like a sleep or a backoff
        (`self._backoff()`), or a function of this module that sleeps."""
        name = self.resolve(call.func) or _last_name(call.func) or ""
        last = name.rsplit(".", 1)[-1]
        return bool(_SLEEPY.search(last)) or last in self.sleepers


def sleeping_functions(tree: ast.Module) -> set[str]:
    """Names of the module's functions and methods whose own body sleeps: calls to them
    are sleeps too (`self._wait(attempt)` that calls `time.sleep`)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for call in _calls(node.body):
                last = _last_name(call.func) or ""
                if _SLEEPY.search(last) and "sleep" in last.lower():
                    out.add(node.name)
                    break
    return out


# ---------------------------------------------------------------- helpers


def _last_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _unawait(node: ast.expr) -> ast.expr:
    return node.value if isinstance(node, ast.Await) else node


def _is_counter(node: ast.expr, resolve: Callable[[ast.expr], str | None]) -> bool:
    if isinstance(node, ast.Call):
        name = resolve(node.func) or _last_name(node.func) or ""
        if name in _COUNTERS or name.rsplit(".", 1)[-1] in ("count", "repeat"):
            return True
        if _last_name(node.func) in ("reversed", "enumerate") and node.args:
            return _is_counter(node.args[0], resolve)
    return False


def _caught_names(handler: ast.ExceptHandler) -> set[str]:
    """The exception class names a handler catches; empty for a bare `except:`."""
    if handler.type is None:
        return set()
    items = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    out: set[str] = set()
    for item in items:
        # `except timeout_exceptions():` names its classes through a helper
        name = _last_name(item.func if isinstance(item, ast.Call) else item)
        out.add(name or "?")
    return out


def recursive_retry(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.Call | None:
    """A retry written as recursion: the function calls itself again with its attempt
    count moved on (`return fetch(url, retries - 1)`, `self.get(..., attempt=attempt + 1)`)
    from an `except` around its call, or under an `if` that finds the status bad. The
    count moved on tells it from recursion over data (a tree, the next page): those
    pass something else."""
    names = {fn.name}
    if not any(isinstance(n, ast.Call) and _callee(n.func, names) for n in ast.walk(fn)):
        return None  # most functions never call themselves: one walk to know it
    params = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    results = {
        t.id
        for n in _walk_own(fn.body)
        if isinstance(n, ast.Assign) and isinstance(_unawait(n.value), ast.Call)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    for node in _walk_own(fn.body):
        bodies: list[list[ast.stmt]] = []
        if isinstance(node, ast.Try | ast.TryStar):
            bodies = [h.body for h in node.handlers if not _data_error_handler(h)]
        else:
            for test, branch in _branches(node):
                if _status_subject(test, results) is not None and _polarity(test) == "bad":
                    bodies.append(branch)
        for body in bodies:
            for sub in _walk_own(body):
                call = _unawait(sub) if isinstance(sub, ast.expr) else None
                if (
                    isinstance(call, ast.Call)
                    and _callee(call.func, names)
                    and _moves_a_count(call, params)
                ):
                    return call
    return None


def _data_error_handler(handler: ast.ExceptHandler) -> bool:
    caught = _caught_names(handler)
    return bool(caught) and all(_data_error(name) for name in caught)


def _callee(func: ast.expr, names: set[str]) -> bool:
    """`fetch(...)` or `self.fetch(...)` / `cls.fetch(...)`."""
    if isinstance(func, ast.Name):
        return func.id in names
    return (
        isinstance(func, ast.Attribute)
        and func.attr in names
        and isinstance(func.value, ast.Name)
        and func.value.id in ("self", "cls")
    )


def _moves_a_count(call: ast.Call, params: set[str]) -> bool:
    """An argument `n - 1` / `n + 1` of a parameter `n`."""
    for arg in [*call.args, *(k.value for k in call.keywords)]:
        if (
            isinstance(arg, ast.BinOp)
            and isinstance(arg.op, ast.Add | ast.Sub)
            and isinstance(arg.left, ast.Name)
            and arg.left.id in params
            and isinstance(arg.right, ast.Constant)
            and arg.right.value == 1
        ):
            return True
    return False


def _branches(node: ast.AST) -> Iterator[tuple[ast.expr, list[ast.stmt]]]:
    """The tests a statement branches on, each with the body it runs: an `if`, and each
    `case 502 | 503:` of a `match response.status_code:`, read as `status in (502, 503)`."""
    if isinstance(node, ast.If):
        yield node.test, node.body
    elif isinstance(node, ast.Match):
        for case in node.cases:
            values = _case_values(case.pattern)
            if values:
                test = ast.Compare(
                    left=node.subject,
                    ops=[ast.In()],
                    comparators=[ast.Tuple(elts=list(values), ctx=ast.Load())],
                )
                yield test, case.body


def _case_values(pattern: ast.pattern) -> list[ast.expr]:
    """The literal values a case pattern matches (`200`, `502 | 503`); [] for others."""
    if isinstance(pattern, ast.MatchValue):
        return [pattern.value]
    if isinstance(pattern, ast.MatchOr):
        values = [_case_values(p) for p in pattern.patterns]
        return [v for vs in values for v in vs] if all(values) else []
    return []


def _status_subject(test: ast.expr, names: set[str]) -> str | None:
    """The result variable whose status `test` checks, if it checks one."""
    literals = [
        n.value for n in ast.walk(test) if isinstance(n, ast.Constant) and type(n.value) is int
    ]
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Attribute) and base.attr in (
                "response",
                "resp",
                "http_response",
            ):
                base = base.value
            if not (isinstance(base, ast.Name) and base.id in names):
                continue
            if node.attr in _STATUS_FLAGS:
                return base.id
            if node.attr in _STATUS_ATTRS and (
                any(400 <= v <= 599 for v in literals) or _retry_named(test)
            ):
                return base.id
        if isinstance(node, ast.Call) and _retry_named(node.func):
            given = [*node.args, *(k.value for k in node.keywords)]
            args = [a for a in given if isinstance(a, ast.Name) and a.id in names]
            if args:
                return args[0].id
    return None


def _polarity(test: ast.expr) -> str | None:
    """Does `test` hold for a failed response ("bad") or a successful one ("good")?"""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _polarity(test.operand)
        return {"bad": "good", "good": "bad"}.get(inner or "")
    if isinstance(test, ast.BoolOp):
        for value in test.values:
            found = _polarity(value)
            if found:
                return found
        return None
    if isinstance(test, ast.Attribute):
        if test.attr in ("ok", "is_success"):
            return "good"
        if test.attr in ("is_error", "is_server_error", "is_client_error"):
            return "bad"
        return None
    if isinstance(test, ast.Call):
        return "bad" if _retry_named(test.func) else None
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op, right = test.ops[0], test.comparators[0]
        numbers = [
            n.value
            for n in ast.walk(test)
            if isinstance(n, ast.Constant) and isinstance(n.value, int)
        ]
        failing = any(v >= 400 for v in numbers) or _retry_named(right)
        if isinstance(op, ast.In | ast.Eq):
            return "bad" if failing else "good"
        if isinstance(op, ast.NotIn | ast.NotEq):
            return "good" if failing else "bad"
        if isinstance(op, ast.Gt | ast.GtE):
            return "bad" if failing else None
        if isinstance(op, ast.Lt | ast.LtE):
            return "good" if failing else None
    return None


def _retry_named(node: ast.expr) -> bool:
    return any(
        "retr" in (n.id if isinstance(n, ast.Name) else n.attr).lower()
        for n in ast.walk(node)
        if isinstance(n, ast.Name | ast.Attribute)
    )


def _outcomes(body: Sequence[ast.stmt]) -> set[str]:
    """How control can leave `body`, within one loop turn: "leave" (return, break),
    "raise", "continue", or "fall" (off its end)."""
    current = {"fall"}
    for stmt in body:
        if "fall" not in current:
            break
        current.discard("fall")
        current |= _stmt_outcomes(stmt)
    return current


def _stmt_outcomes(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.Return | ast.Break):
        return {"leave"}
    if isinstance(stmt, ast.Raise):
        return {"raise"}
    if isinstance(stmt, ast.Continue):
        return {"continue"}
    if isinstance(stmt, ast.If):
        return _outcomes(stmt.body) | _outcomes(stmt.orelse)
    if isinstance(stmt, ast.With | ast.AsyncWith):
        return _outcomes(stmt.body)
    if isinstance(stmt, ast.Try | ast.TryStar):
        out = _outcomes([*stmt.body, *stmt.orelse])
        for handler in stmt.handlers:
            out |= _outcomes(handler.body)
        if stmt.finalbody and "fall" not in _outcomes(stmt.finalbody):
            return _outcomes(stmt.finalbody)
        return out
    if isinstance(stmt, ast.Match):
        out = set()
        for case in stmt.cases:
            out |= _outcomes(case.body)
        return out | {"fall"}
    return {"fall"}  # nested loops keep their own break and continue


def _always_exits(body: Sequence[ast.stmt], leave_only: bool = False) -> bool:
    """Every path through `body` ends the loop turn by leaving (`return`, `break`,
    `raise`; with leave_only, `raise` does not count: it is not a success)."""
    allowed = {"leave"} if leave_only else {"leave", "raise"}
    return _outcomes(body) <= allowed


def _derived(loop: ast.For | ast.AsyncFor, targets: set[str]) -> set[str]:
    """The loop's item and the names the body computes from it (`i = (start + k) % n`);
    an attempt number stays itself: what it feeds is still the same call."""
    out = {t for t in targets}
    if all(_ATTEMPT_NAME.search(t) for t in targets):
        return out
    grew = True
    while grew:
        grew = False
        for node in _walk_own(loop.body):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) and node.value:
                reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                if not reads & out:
                    continue
                targets_ = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets_:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name) and n.id not in out:
                            out.add(n.id)
                            grew = True
    return out


def _walking(loop: Loop) -> set[str]:
    """Names each turn derives from their value in the previous turn by plain data
    steps (`parent = current.parent; current = parent`, `offset += size`): a loop
    that feeds them to its call works on a different thing every turn."""
    deps: dict[str, set[str]] = {}
    first_store: dict[str, tuple[int, int]] = {}
    loads: list[tuple[str, tuple[int, int]]] = []
    tested = list(ast.walk(loop.test)) if isinstance(loop, ast.While) else []
    for node in [*tested, *_walk_own(loop.body)]:
        name = dotted_name(node)
        if name and isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
            loads.append((name, (node.lineno, node.col_offset)))
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) and node.value:
            # plain derivations, or a call fed the name itself (`state = step(state)`);
            # any other value a call returns may be anything
            reads = {d for n in ast.walk(node.value) if (d := dotted_name(n))}
            if any(isinstance(n, ast.Call | ast.Await) for n in ast.walk(node.value)):
                targets_text = {
                    dotted_name(t)
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                }
                reads &= targets_text
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                items = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
                for item in items:
                    name = dotted_name(item)
                    if not name:
                        continue
                    own = {name} if isinstance(node, ast.AugAssign) else set()
                    deps.setdefault(name, set()).update(reads | own)
                    where = (item.lineno, item.col_offset)
                    first_store[name] = min(first_store.get(name, where), where)
    carried = {n for n, at in loads if n in first_store and at < first_store[n]}
    out: set[str] = set()
    for name in carried:
        seen: set[str] = set()
        todo = list(deps.get(name, ()))
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(deps.get(dep, ()))
        if name in seen:
            out.add(name)
    return out


def dotted_name(node: ast.AST) -> str | None:
    """`x` or `self.x` as text (what a name or library object was bound to)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _assigned_names(body: Sequence[ast.stmt]) -> set[str]:
    """What `body` assigns, as text (`done`, `self.done`; tuple targets unpacked)."""
    out: set[str] = set()
    for node in _walk_own(body):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                items = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
                out.update(t for t in map(dotted_name, items) if t)
    return out


def _own_tries(body: Sequence[ast.stmt]) -> Iterator[tuple[int, ast.Try | ast.TryStar]]:
    """Each try of the loop's own body, with the index of the top-level statement
    that holds it (statements after that index run after the try)."""
    for index, stmt in enumerate(body):
        for node in _walk_own([stmt]):
            if isinstance(node, ast.Try | ast.TryStar):
                yield index, node


def _calls(body: Sequence[ast.stmt]) -> list[ast.Call]:
    return [n for n in _walk_own(body) if isinstance(n, ast.Call)]


_OWN_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.For,
    ast.AsyncFor,
    ast.While,
)


def _walk_own(body: Sequence[ast.stmt]) -> Iterator[ast.AST]:
    """Nodes under `body`, not descending into nested functions, classes or loops."""
    stack: list[ast.AST] = [n for n in reversed(body) if not isinstance(n, _OWN_SCOPES)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(
            child for child in ast.iter_child_nodes(node) if not isinstance(child, _OWN_SCOPES)
        )
