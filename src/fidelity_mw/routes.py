"""Route identity: which breaker and which limits a request belongs to.

Identity must have bounded cardinality (one breaker per route, not per URL),
so raw paths are never used. In order: the first `[[route]]` of the policy
that matches; else the framework's route template (Starlette/FastAPI routes
found through `scope["app"]`); else `UNMATCHED`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.routing import Match

from .overrides import flat_routes

UNMATCHED = "!unmatched"


def framework_template(scope: Mapping[str, Any], fallback_app: object = None) -> str | None:
    """The path template of the Starlette/FastAPI route that will serve `scope`."""
    routes = getattr(scope.get("app") or fallback_app, "routes", None)
    if not routes:
        return None
    partial: str | None = None
    try:
        for route in flat_routes(routes):  # FastAPI's included routers opened up
            match, _child = route.matches(scope)
            path = getattr(route, "path", None) or getattr(route, "path_format", None)
            if match == Match.FULL:
                if path is not None and hasattr(route, "routes") and not hasattr(route, "endpoint"):
                    return f"{path}/*"  # a Mount: its sub-routes share the prefix
                return str(path) if path is not None else None
            if match == Match.PARTIAL and partial is None and path is not None:
                partial = str(path)  # method not allowed: same route, other verb
    except Exception:  # a third-party route type that cannot match this scope
        return None
    return partial
