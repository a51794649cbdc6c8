"""One exception tree. Everything fidelity_mw raises on purpose is a `FidelityError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx


class FidelityError(Exception):
    """Base of every error fidelity_mw raises on purpose."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy: where (a key path such as `rate_limit[1].rate`) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyError(FidelityError, ValueError):
    """A policy is invalid. `issues` lists every problem found, each with its key path."""

    def __init__(
        self,
        issues: list[PolicyIssue],
        source: str | None = None,
        lines: Mapping[str, int | None] | None = None,
    ) -> None:
        self.issues = issues
        self.source = source
        # key path -> line in the file (`Policy.from_toml`), so the message a failing
        # startup prints points at the line, as `fidelity-mw check` does
        self.lines: Mapping[str, int | None] = lines or {}
        where = f"{source}: " if source else ""
        text = "\n".join(f"  - {self._line(issue)}{issue}" for issue in issues)
        super().__init__(f"{where}invalid policy ({len(issues)} problem(s)):\n{text}")

    def _line(self, issue: PolicyIssue) -> str:
        line = self.lines.get(issue.path) if issue.path else None
        return f"line {line}: " if line is not None else ""

    @classmethod
    def at(cls, path: str, message: str) -> PolicyError:
        return cls([PolicyIssue(path, message)])

    def prefixed(self, prefix: str) -> PolicyError:
        """The same issues, their paths nested under `prefix`."""
        joined = [
            PolicyIssue(f"{prefix}.{i.path}" if i.path else prefix, i.message) for i in self.issues
        ]
        return PolicyError(joined, self.source)  # new paths: the lines no longer apply


class StateUnavailable(FidelityError):
    """The state store (Redis) could not be reached in time, or cannot serve (a
    read-only replica). `why`, when the store says: "unreachable", "read_only",
    "error" (it is up, and this call failed) or "deadline" (the request's deadline came
    before its answer), as `fallback_why` in decision details."""

    def __init__(self, *args: object, why: str | None = None) -> None:
        super().__init__(*args)
        self.why = why


class CircuitOpen(FidelityError, httpx.TransportError):
    """An outbound call was refused because the upstream host's breaker is open.

    It is an `httpx.TransportError`, so code that already handles
    `httpx.RequestError` / `httpx.TransportError` handles it too.
    `attempts_made` is 0 when nothing was sent (fail over to another instance
    freely), or how many attempts went out before the breaker opened.
    `state_error` is the state store's failure when the breaker was not open but its
    state could not be read and the policy fails closed (`[state] on_error = "closed"`);
    None for an open breaker. `state_of` then names the state that could not be read:
    "breaker", or "retry budget" for an upstream without a breaker (`breaker = false`).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str,
        retry_after_s: float,
        attempts_made: int = 0,
        state_error: BaseException | None = None,
        state_of: str = "breaker",
    ) -> None:
        super().__init__(message)
        self.host = host
        self.retry_after_s = retry_after_s
        self.attempts_made = attempts_made
        self.state_error = state_error
        self.state_of = state_of


class DeadlineExceeded(FidelityError, httpx.TimeoutException):
    """An outbound call was not (re)tried because the request's deadline had passed.

    It is an `httpx.TimeoutException`, so `except httpx.TimeoutException`
    (or `httpx.TransportError`) catches it, like any other timeout.
    """

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class SendStalled(FidelityError, ConnectionError):
    """A body message of a streamed response was not taken by the client within the
    route's `[concurrency] send_stall_timeout_s`: the middleware gave the request's
    bulkhead slot back and ended the response. Raised into the app from `send`, as a
    server raises for a connection that is gone (ASGI 2.4: an `OSError`): Starlette's
    streaming responses end on it as on a client disconnect."""

    def __init__(self, message: str, *, route: str, stalled_s: float) -> None:
        super().__init__(message)
        self.route = route
        self.stalled_s = stalled_s
