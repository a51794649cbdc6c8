"""What a retry library's condition retries, read from its arguments.

A migrated retry should retry the same failures as the code it replaces. The
transport retries connect errors, read timeouts and 502/503/504 by default; a
decorator retrying `httpx.TransportError` alone never retried a status (a 5xx
reaches it as `raise_for_status()`'s `HTTPStatusError`), and one retrying on a
result (`retry_if_result(lambda r: r.status_code == 503)`,
`backoff.on_predicate(...)`) retried that status and no error at all. This
module reads such conditions (tenacity's `retry=`, stamina's `on=`, backoff's
exception and predicate) into the `[upstream.retry]` keys that keep them so.
A condition it cannot read (a function of the app's, an exception class of its
own, a `giveup=`) yields no key: the hint then says nothing it does not know.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

# No key, nothing retried, errors raised before an answer came only, or possibly an
# answer's status error too.
NONE = "none"
TRANSPORT = "transport"
STATUS = "status"

# httpx's errors that are never an answer's status (`raise_for_status()` raises
# HTTPStatusError; HTTPError and Exception are its bases)
_NOT_STATUS = frozenset(
    (
        "TransportError", "TimeoutException", "ConnectTimeout", "ReadTimeout", "WriteTimeout",
        "PoolTimeout", "NetworkError", "ConnectError", "ReadError", "WriteError", "CloseError",
        "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "ProxyError",
        "UnsupportedProtocol", "RequestError", "DecodingError", "TooManyRedirects",
    )
)  # fmt: skip
_STATUS_BASES = frozenset(("HTTPStatusError", "HTTPError", "Exception", "BaseException"))
_SERVER_ERRORS = frozenset(range(500, 600))


# A connect error alone: the request was never sent (`on_connect_error` covers both)
_CONNECT_ONLY = frozenset(("ConnectError", "ConnectTimeout"))


@dataclass(frozen=True, slots=True)
class RetriedOn:
    errors: str  # NONE | TRANSPORT | STATUS
    statuses: frozenset[int] = frozenset()
    # errors after the request went out (a read timeout, a reset) retried too: False for
    # `retry_if_exception_type(httpx.ConnectError)`, which raised them at once
    after_sending: bool = True


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def exceptions(node: ast.expr | None) -> RetriedOn | None:
    """An exception class or a tuple of them, as a library's condition names them."""
    if node is None:
        return None
    names = node.elts if isinstance(node, ast.Tuple | ast.List) else [node]
    if not names:
        return RetriedOn(NONE)
    kinds = set()
    found = set()
    for item in names:
        name = _name(item)
        if name in _STATUS_BASES:
            kinds.add(STATUS)
        elif name in _NOT_STATUS:
            kinds.add(TRANSPORT)
        else:  # a class of the app's may be raised on a status: not said
            return None
        found.add(name)
    errors = STATUS if STATUS in kinds else TRANSPORT
    return RetriedOn(errors, after_sending=not found <= _CONNECT_ONLY)


def _ints(node: ast.expr) -> frozenset[int] | None:
    if not isinstance(node, ast.Tuple | ast.List | ast.Set):
        return None
    values = [
        item.value
        for item in node.elts
        if isinstance(item, ast.Constant) and type(item.value) is int
    ]
    return frozenset(values) if len(values) == len(node.elts) else None


def _status_test(node: ast.expr, arg: str) -> frozenset[int] | None:
    """The statuses a predicate's body is true for: `r.status_code == 503`, `in (...)`,
    `>= 500`, `r.is_server_error`, and `or` of those; None for anything else."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        found: set[int] = set()
        for value in node.values:
            part = _status_test(value, arg)
            if part is None:
                return None
            found |= part
        return frozenset(found)
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == arg
        and node.attr == "is_server_error"
    ):
        return _SERVER_ERRORS
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1):
        return None
    left, op, right = node.left, node.ops[0], node.comparators[0]
    if not (
        isinstance(left, ast.Attribute)
        and isinstance(left.value, ast.Name)
        and left.value.id == arg
        and left.attr in ("status_code", "status")
    ):
        return None
    if isinstance(op, ast.In):
        return _ints(right)
    if not (isinstance(right, ast.Constant) and type(right.value) is int):
        return None
    n = right.value
    if isinstance(op, ast.Eq):
        return frozenset((n,)) if 100 <= n <= 599 else None
    if isinstance(op, ast.GtE | ast.Gt):
        low = n if isinstance(op, ast.GtE) else n + 1
        return frozenset(range(max(low, 100), 600))
    return None


def predicate_statuses(node: ast.expr | None) -> frozenset[int] | None:
    """`lambda r: r.status_code == 503` (or `in (502, 503)`, `>= 500`)."""
    if not isinstance(node, ast.Lambda) or len(node.args.args) != 1:
        return None
    return _status_test(node.body, node.args.args[0].arg)


def _union(a: RetriedOn | None, b: RetriedOn | None) -> RetriedOn | None:
    if a is None or b is None:
        return None
    order = (NONE, TRANSPORT, STATUS)
    errors = max(a.errors, b.errors, key=order.index)
    # a result's test (NONE) retries no error, so it leaves the other side's as they are
    sending = [on.after_sending for on in (a, b) if on.errors != NONE]
    return RetriedOn(errors, a.statuses | b.statuses, any(sending) if sending else True)


def _last(node: ast.expr) -> str:
    func = node.func if isinstance(node, ast.Call) else node
    return _name(func) or ""


def tenacity_condition(node: ast.expr | None) -> RetriedOn | None:
    """tenacity's `retry=`: absent (any exception), `retry_if_exception_type(...)`,
    `retry_if_result(lambda ...)`, and `|` or `retry_any(...)` of them."""
    if node is None:  # tenacity's default: retry_if_exception_type(), any exception
        return RetriedOn(STATUS)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union(tenacity_condition(node.left), tenacity_condition(node.right))
    if not isinstance(node, ast.Call):
        return None
    name = _last(node)
    if name == "retry_any" and not node.keywords and node.args:
        found: RetriedOn | None = RetriedOn(NONE)
        for arg in node.args:
            found = _union(found, tenacity_condition(arg))
        return found
    if name == "retry_if_exception_type" and not node.keywords and len(node.args) <= 1:
        return exceptions(node.args[0]) if node.args else RetriedOn(STATUS)
    if name == "retry_if_result" and len(node.args) == 1 and not node.keywords:
        statuses = predicate_statuses(node.args[0])
        return RetriedOn(NONE, statuses) if statuses is not None else None
    return None


def keys(on: RetriedOn | None) -> dict[str, object]:
    """The `[upstream.retry]` keys that retry what `on` retries, past the defaults.

    A condition that may see a status error (with `raise_for_status()`, any 4xx or
    5xx) keeps the defaults, as docs/migration.md says: 502, 503 and 504 retried."""
    if on is None or on.errors == STATUS:
        return {}
    out: dict[str, object] = {}
    statuses = set(on.statuses - {429})
    listed: list[object] = []
    if statuses >= _SERVER_ERRORS:
        statuses -= _SERVER_ERRORS
        listed.append("5xx")
    out["on_status"] = sorted(statuses) + listed
    if on.errors == NONE:  # a result's test alone: a connect error was raised, not retried
        out["on_connect_error"] = False
        out["on_read_timeout"] = False
    elif not on.after_sending:  # connect errors alone: a read timeout was raised at once
        out["on_read_timeout"] = False
    return out
