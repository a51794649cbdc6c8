"""Per-endpoint overrides declared in code: a route's breaker and deadline, next to its handler.

`fidelity_mw.fastapi.Fidelity.breaker(...)` / `.deadline(...)` mark an endpoint
function; the engine reads the mark when it builds the plan of the route that
serves a request, so the middleware (or, without it, the FastAPI route class)
enforces the override with the same breaker and deadline machinery as a
`[[route]]` entry of the policy. An override changes only what it names; the
rest comes from the matching `[[route]]` entry, else from the policy's
defaults. The route keeps its identity (the `[[route]]` name, else the path
template), so its breaker state and traces stay where they were.

No framework import here (the engine imports this module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from .policy import BreakerConfig, RouteConfig
from .routes import framework_route

ROUTE_ATTR: Final = "__fidelity_route__"

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class EndpointOverride:
    """What an endpoint overrides; None leaves a field to the policy."""

    breaker: bool | BreakerConfig | None = None
    deadline_ms: int | None = None


def mark(endpoint: _F, **changes: Any) -> _F:
    """Record an override on the endpoint function (decorators stack in any order)."""
    current = getattr(endpoint, ROUTE_ATTR, None) or EndpointOverride()
    setattr(endpoint, ROUTE_ATTR, replace(current, **changes))
    return endpoint


def override_of(endpoint: object) -> EndpointOverride | None:
    found = getattr(endpoint, ROUTE_ATTR, None)
    return found if isinstance(found, EndpointOverride) else None


def endpoint_overrides(
    scope: Mapping[str, Any], fallback_app: object, cfg: RouteConfig | None
) -> RouteConfig | None:
    """`cfg` (the policy's `[[route]]` entry, or None) with the serving endpoint's override.

    The route is the one `routes.framework_template` names (no `route.matches()`
    call: that is the app's router's to make). Called once per (method, path) when
    the engine builds a plan, never per request.
    """
    found = framework_route(scope, fallback_app)
    if found is None or found[1] is None:
        return cfg
    template, route = found
    override = override_of(getattr(route, "endpoint", None))
    return cfg if override is None else merged(cfg, override, template)


def merged(cfg: RouteConfig | None, override: EndpointOverride, template: str) -> RouteConfig:
    changes: dict[str, Any] = {}
    if override.breaker is not None:
        changes["breaker"] = override.breaker
    if override.deadline_ms is not None:
        changes["deadline_ms"] = override.deadline_ms
    if cfg is None:
        # `match` is not used again (the plan is built for this path); the name keeps
        # the route identity the path template would have given it.
        return RouteConfig(match="*", name=template, **changes)
    return replace(cfg, **changes)
