"""Route identity: which breaker and which limits a request belongs to.

Identity must have bounded cardinality (one breaker per route, not per URL),
so raw paths are never used. In order: the first `[[route]]` of the policy
that matches; else the framework's route template (Starlette/FastAPI routes
found through `scope["app"]`); else `UNMATCHED`.

Naming reads each route's compiled `path_regex` and `methods` and never calls
`route.matches()`: that method is the app's to override (counting, side
effects, expensive checks), and the app's router calls it once already. The
module duck-types Starlette's route classes, so it imports no framework.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

UNMATCHED = "!unmatched"


def flat_routes(routes: Iterable[Any]) -> list[Any]:
    """The app's routes with FastAPI's included routers opened up.

    Recent FastAPI keeps an `include_router` router as one entry with no path
    template of its own; `fastapi.routing.iter_route_contexts` lists what is
    inside, each with its full path, `path_regex`, methods and endpoint.
    Older FastAPI and Starlette list the routes themselves. FastAPI is only
    looked up, never imported: an app that has FastAPI routes has imported it.
    """
    routing = sys.modules.get("fastapi.routing")
    iter_contexts = getattr(routing, "iter_route_contexts", None)
    if iter_contexts is None:
        return list(routes)
    return list(iter_contexts(list(routes)))


def _route_path(scope: Mapping[str, Any]) -> str:
    """The path the router matches against: `path` without the `root_path` mount prefix."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


# Mounts inside mounts are followed this deep (a cycle of apps must not recurse forever).
_MAX_MOUNT_DEPTH = 8


def framework_template(scope: Mapping[str, Any], fallback_app: object = None) -> str | None:
    """The path template of the Starlette/FastAPI route that will serve `scope`."""
    found = framework_route(scope, fallback_app)
    return None if found is None else found[0]


def framework_route(
    scope: Mapping[str, Any], fallback_app: object = None
) -> tuple[str, Any] | None:
    """The path template of the route that will serve `scope`, and that route (None: a
    mount whose app has no routes to look into, or a method the route does not allow).

    A mounted app's routes are looked into (`app.mount("/v2", v2)`: `/v2/orders`, not one
    identity, one breaker and one default limit counter for every route under `/v2`); a
    path none of them serves keeps the mount's own identity."""
    routes = getattr(scope.get("app") or fallback_app, "routes", None)
    if not routes:
        return None
    try:
        return _match(routes, _route_path(scope), scope.get("method"), 0)
    except Exception:  # a third-party route object with odd attributes
        return None


def _match(
    routes: Iterable[Any], route_path: str, method: object, depth: int
) -> tuple[str, Any] | None:
    partial: tuple[str, Any] | None = None
    for route in flat_routes(routes):  # FastAPI's included routers opened up
        regex = getattr(route, "path_regex", None)
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if regex is None or path is None:
            continue  # Host, or a route type of its own: no path template to use
        # a mount (FastAPI's route contexts give one an endpoint too: its routes tell it)
        is_mount = hasattr(route, "routes")
        if not is_mount and not hasattr(route, "methods"):
            continue  # a websocket route never serves an http request
        matched = regex.match(route_path)
        if matched is None:
            continue
        if is_mount:
            inner = None
            sub_routes = getattr(route, "routes", None)
            rest = matched.groupdict().get("path")
            if sub_routes and rest is not None and depth < _MAX_MOUNT_DEPTH:
                inner = _match(sub_routes, "/" + rest, method, depth + 1)
            if inner is not None:
                return f"{str(path).rstrip('/')}{inner[0]}", inner[1]
            # its sub-routes share the prefix (a FastAPI route context or a Starlette
            # Mount alike: "/v2" was the name when FastAPI was imported, "/v2/*" without)
            return f"{str(path).rstrip('/')}/*", None
        methods = route.methods
        if methods and method not in methods:
            if partial is None:
                partial = (str(path), None)  # method not allowed: same route, other verb
            continue
        return str(path), route
    return partial
