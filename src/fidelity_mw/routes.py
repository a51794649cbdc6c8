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
# `_serving`'s route for a request a `Host` matches but none of its app's routes serve
# (`<host>/*`): no route (`serving_route` gives None), but the host app's own router may
# still redirect it to the path with or without its final slash (`slash_redirect`).
_HOST_MISS = ("host miss",)


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


_MAX_MOUNT_DEPTH = 8


def framework_template(scope: Mapping[str, Any], fallback_app: object = None) -> str | None:
    """The path template of the Starlette/FastAPI route that will serve `scope`.

    A request under a `Mount` is named by the mounted route that serves it, its template
    prefixed by the mount's (`/api` + `/items/{id}`), so each route of a mounted router or
    sub-app keeps a breaker of its own; a mount whose app lists no routes (or none that
    match) is `<mount>/*`. A request a `Host` route matches is named by the host pattern
    and the route of the host's app that serves it (`api.example.com/items/{id}`), or
    `<host>/*` when none of them does (Starlette goes no further than the host)."""
    found = serving_route(scope, fallback_app)
    return None if found is None else found[0]


def serving_route(scope: Mapping[str, Any], fallback_app: object = None) -> tuple[str, Any] | None:
    """(the template `framework_template` names, the route object that serves `scope`, or
    None when no route serves its method or the request goes to a mounted app of its own)."""
    routes = getattr(scope.get("app") or fallback_app, "routes", None)
    if not routes:
        return None
    try:
        found = _serving(routes, _route_path(scope), scope.get("method"), 0, scope)
    except Exception:  # a third-party route object with odd attributes
        return None
    if found is not None and found[1] is _HOST_MISS:
        return found[0], None
    return found


def _host(scope: Mapping[str, Any]) -> str:
    """The request's host without its port, as Starlette's `Host` route matches it."""
    for name, value in scope.get("headers") or ():
        if name == b"host":
            host: str = value.decode("latin-1")
            return host.split(":")[0]
    return ""


def _serving(
    routes: Iterable[Any],
    route_path: str,
    method: object,
    depth: int,
    scope: Mapping[str, Any],
) -> tuple[str, Any] | None:
    partial: str | None = None
    for route in flat_routes(routes):  # FastAPI's included routers opened up
        host_regex = getattr(route, "host_regex", None)
        if host_regex is not None and getattr(route, "path_regex", None) is None:
            # Starlette's `Host`: its app sees the whole path; a request it serves is
            # named by the host pattern and the route of its app that serves it
            # (`api.example.com/items/{id}`), so one template under two hosts keeps two
            # breakers and two default counters, as under two mounts
            if depth >= _MAX_MOUNT_DEPTH or host_regex.match(_host(scope)) is None:
                continue
            pattern = str(getattr(route, "host", "") or "")
            sub = getattr(route, "routes", None)
            inner = _serving(sub, route_path, method, depth + 1, scope) if sub else None
            if inner is not None:
                return pattern + inner[0], inner[1]
            # Starlette routes it to this host's app whatever the path (a Host match is
            # full): later routes never see it; its 404 (or the app of its own) is the
            # host's, as a mount's is `<mount>/*`
            return f"{pattern}/*", _HOST_MISS
        regex = getattr(route, "path_regex", None)
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if regex is None or path is None:
            continue  # a route type of its own: no path template to use
        # (FastAPI lists every route, a Mount too, as a RouteContext whose `endpoint` is
        # None for a mount: "no attribute" alone took a mount for a route named "/api")
        is_mount = getattr(route, "endpoint", None) is None and hasattr(route, "routes")
        if not is_mount and not hasattr(route, "methods"):
            continue  # a websocket route never serves an http request
        found = regex.match(route_path)
        if found is None:
            continue
        if is_mount:
            # the mounted routes see the rest of the path, as Starlette's Mount passes it on
            rest = found.groupdict().get("path")
            inner = None
            if rest is not None and depth < _MAX_MOUNT_DEPTH:
                sub = getattr(route, "routes", None)
                if sub:
                    inner = _serving(sub, "/" + rest, method, depth + 1, scope)
            if inner is not None:
                return str(getattr(route, "path", "") or "") + inner[0], inner[1]
            return f"{path}/*", None  # an app of its own (or no route of it matches)
        methods = route.methods
        if methods and method not in methods:
            if partial is None:
                partial = str(path)  # method not allowed: same route, other verb
            continue
        return str(path), route
    return None if partial is None else (partial, None)


def slash_redirect(scope: Mapping[str, Any], fallback_app: object = None) -> bool:
    """Will the app's router answer `scope` with its own trailing-slash redirect?
    (Starlette's `redirect_slashes`, on by default: no route serves the path, and one
    serves it with the final slash added or taken off, whatever its method.)"""
    app = scope.get("app") or fallback_app
    router = getattr(app, "router", app)
    if getattr(router, "redirect_slashes", False) is not True:
        return False
    routes = getattr(router, "routes", None)
    path = _route_path(scope)
    if not routes or not path or path == "/":
        return False
    other = path.rstrip("/") if path.endswith("/") else path + "/"
    method = scope.get("method")
    try:
        here = _serving(routes, path, method, 0, scope)
        there = _serving(routes, other, method, 0, scope)
        # (under a `Host`: its app's router redirects what none of its routes serve)
        return (here is None or here[1] is _HOST_MISS) and not (
            there is None or there[1] is _HOST_MISS
        )
    except Exception:  # a third-party route object with odd attributes
        return False
