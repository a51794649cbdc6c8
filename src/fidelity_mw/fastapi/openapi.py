"""OpenAPI entries for the rejections a route can give (RFC 9457 problem schema)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

from fastapi.dependencies.models import Dependant

from ..overrides import merged, override_of
from ..policy import BreakerConfig, ConcurrencyConfig, Policy
from ..policy.model import covers_method, glob_matches, names_head
from ..rejections import (
    PROBLEM_MEDIA_TYPE,
)
from .limit import LimitDependency

PROBLEM_SCHEMA: Final[dict[str, Any]] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "limit": {"type": "string", "description": "the rate limit that rejected (429)"},
        "route": {"type": "string", "description": "the route whose breaker shed (503)"},
    },
    "required": ["type", "title", "status", "detail"],
}

_DESCRIPTIONS: Final = {
    429: "Rate limited: retry after `Retry-After` seconds",
    503: "Shed by the route's circuit breaker or concurrency limit: retry after "
    "`Retry-After` seconds",
    504: "The request's deadline passed before it could be served",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for our rejections (pass to a route's `responses=`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _DESCRIPTIONS.get(status, "Rejected by fidelity_mw"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}},
        }
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        out[status] = entry
    return out


# ---------------------------------------------------------------- OpenAPI


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


_PARAM: Final = re.compile(r"\{[^}]*\}")


def _policy_limits(route: Any, policies: Sequence[tuple[Policy, str]]) -> bool:
    """Whether a `[[rate_limit]]` of the middleware's policies can refuse the route: its
    `match` (and no `exclude`) covers the route's path (each parameter a sample value,
    after the path the app is mounted at) and its `methods` one of the route's methods.
    Shadow limits never refuse."""
    path = _PARAM.sub("x", str(getattr(route, "path", "") or ""))
    methods = getattr(route, "methods", None) or {"GET"}
    for policy, at in policies:
        full = at + path
        head_named = names_head(policy.rate_limits)
        for lim in policy.rate_limits:
            if lim.shadow or not glob_matches(lim.match, full):
                continue
            if any(glob_matches(glob, full) for glob in lim.exclude):
                continue
            if any(covers_method(lim.methods, method, head_named) for method in methods):
                return True
    return False


def _policy_refusals(route: Any, policies: Sequence[tuple[Policy, str]]) -> set[int]:
    """The middleware's own refusals the route can get from its policies, as the engine
    builds a route's plan (engine.py `_build_plan`): 503 with a route breaker or a
    bulkhead (`[concurrency]`), 504 with an enforced deadline (a default, or a header a
    caller can send one in). The endpoint's decorators (overrides.py) count too."""
    path = _PARAM.sub("x", str(getattr(route, "path", "") or ""))
    methods = getattr(route, "methods", None) or {"GET"}
    override = override_of(getattr(route, "endpoint", None))
    found: set[int] = set()
    for policy, at in policies:
        full = at + path
        head_named = names_head(policy.routes)
        for method in methods:
            cfg = next(
                (
                    c
                    for c in policy.routes
                    if glob_matches(c.match, full) and covers_method(c.methods, method, head_named)
                ),
                None,
            )
            if override is not None:
                cfg = merged(cfg, override, path)
            breaker: BreakerConfig | None = policy.breaker
            concurrency: ConcurrencyConfig | None = policy.concurrency
            deadline = policy.deadline.default_ms is not None or bool(policy.deadline.header)
            enforce = True
            if cfg is not None:
                if isinstance(cfg.breaker, BreakerConfig):
                    breaker = cfg.breaker
                elif cfg.breaker is False:
                    breaker = None
                if isinstance(cfg.concurrency, ConcurrencyConfig):
                    concurrency = cfg.concurrency
                elif cfg.concurrency is False:
                    concurrency = None
                deadline = deadline or cfg.deadline_ms is not None
                enforce = cfg.enforce
            if breaker is not None or concurrency is not None:
                found.add(503)
            if deadline and enforce:
                found.add(504)
    return found


def document(
    route: Any,
    enforced: bool = False,
    policies: Sequence[tuple[Policy, str]] = (),
    refusals: bool = False,
) -> None:
    """Add 429 / 503 / 504 problem responses the route can give to its OpenAPI entry.

    `route`: an APIRoute, or FastAPI's view of one inside an included router
    (its `responses` is the dict the OpenAPI generator reads). `policies`: the policies
    of the middleware in front of the route, each with the path the route's app is
    mounted at: a `[[rate_limit]]` covering the route documents its 429 too, and with
    `refusals` the middleware's 503 (breaker, bulkhead) and 504 (deadline) as well."""
    statuses: list[int] = []
    if any(isinstance(call, LimitDependency) for call in _calls(route.dependant)) or (
        policies and _policy_limits(route, policies)
    ):
        statuses.append(429)
    override = override_of(route.endpoint)
    middleware = _policy_refusals(route, policies) if refusals and policies else set()
    if (
        enforced
        or (override is not None and override.breaker not in (None, False))
        or 503 in middleware
    ):
        statuses.append(503)
    if enforced or (override is not None and override.deadline_ms is not None) or 504 in middleware:
        statuses.append(504)
    for status, entry in problem_responses(*statuses).items():
        # the app's own entry stays, under either spelling FastAPI takes (429 or "429"):
        # ours under the int merged into its "429", its description replaced by ours
        if status not in route.responses and str(status) not in route.responses:
            route.responses[status] = entry
