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
from typing import Any, NamedTuple

UNMATCHED = "!unmatched"
# `_serving`'s route for a request a `Host` matches but none of its app's routes serve
# (`<host>/*`): no route (`serving_route` gives None), but the host app's own router may
# still redirect it to the path with or without its final slash (`slash_redirect`).
_HOST_MISS = ("host miss",)


class Served(NamedTuple):
    """What serves a request, as `_serving` finds it."""

    # The `Host` pattern(s) the request went through ("" without one): part of the
    # route's name (two hosts keep two breakers), never of its path template.
    host: str
    # The route's path as its name has it, mount prefixes included (`/api/items/{id}`;
    # `/api/*` for a mount none of whose routes serves the request).
    path: str
    # The path template for `http.route` (OpenTelemetry's HTTP conventions: the
    # framework's template, the path alone), or None where there is none (a `Host`
    # none of whose routes serves the request).
    template: str | None
    # The route object; None when no route serves the method (405) or the request goes
    # to a mounted app of its own; `_HOST_MISS` under a `Host` none of whose routes does.
    route: Any

    @property
    def name(self) -> str:
        """The route identity: the host pattern, then the path (`api.example.com/items/{id}`)."""
        return self.host + self.path


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


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the router matches against: `path` without the `root_path` mount prefix
    (Starlette's `get_route_path`). Servers differ on whether `path` holds the root path
    (the ASGI spec says it does; uvicorn before 0.26 left it out): a path that does not
    start with it is the route path already, so both conventions give the same answer."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


_MAX_MOUNT_DEPTH = 8


def framework_template(scope: Mapping[str, Any], fallback_app: object = None) -> str | None:
    """The name of the Starlette/FastAPI route that will serve `scope`.

    A request under a `Mount` is named by the mounted route that serves it, its template
    prefixed by the mount's (`/api` + `/items/{id}`), so each route of a mounted router or
    sub-app keeps a breaker of its own; a mount whose app lists no routes (or none that
    match) is `<mount>/*`. A request a `Host` route matches is named by the host pattern
    and then the path of the route of the host's app that serves it
    (`api.example.com/items/{id}`; under a mount too: `api.example.com/api/items/{id}`),
    or `<host>/*` when none of them does (Starlette goes no further than the host)."""
    found = framework_route(scope, fallback_app)
    return None if found is None else found.name


def framework_route(scope: Mapping[str, Any], fallback_app: object = None) -> Served | None:
    """The route that serves `scope` (`Served`: its name's parts, its `http.route` template,
    the route object), or None when no route of the app's matches its path."""
    routes = getattr(scope.get("app") or fallback_app, "routes", None)
    if not routes:
        return None
    try:
        return _serving(routes, route_path(scope), scope.get("method"), 0, scope)
    except Exception:  # a third-party route object with odd attributes
        return None


def serving_route(scope: Mapping[str, Any], fallback_app: object = None) -> tuple[str, Any] | None:
    """(the name `framework_template` gives, the route object that serves `scope`, or
    None when no route serves its method or the request goes to a mounted app of its own)."""
    found = framework_route(scope, fallback_app)
    if found is None:
        return None
    return found.name, None if found.route is _HOST_MISS else found.route


def _host(scope: Mapping[str, Any]) -> str:
    """The request's host without its port, as Starlette's `Host` route matches it:
    lowercased (host names are case-insensitive, and Starlette matches the lowercased
    host), an IP literal with its brackets (`[::1]`)."""
    for name, value in scope.get("headers") or ():
        if name == b"host":
            host: str = value.decode("latin-1").lower()
            if host.startswith("["):
                end = host.find("]")
                return host[: end + 1] if end > 0 else host
            return host.split(":")[0]
    return ""


def _is_websocket_route(route: Any) -> bool:
    """A websocket route (Starlette's `WebSocketRoute`, FastAPI's `APIWebSocketRoute`):
    one with no `methods`. FastAPI's `RouteContext` (an included router's route, opened
    up) has a `methods` property of its own, None for a websocket route: its
    `original_route` is the route itself."""
    return not hasattr(getattr(route, "original_route", route), "methods")


def _is_mount(route: Any) -> bool:
    # (FastAPI lists every route, a Mount too, as a RouteContext whose `endpoint` is
    # None for a mount: "no attribute" alone took a mount for a route named "/api")
    return getattr(route, "endpoint", None) is None and hasattr(route, "routes")


def _serving(
    routes: Iterable[Any],
    route_path: str,
    method: object,
    depth: int,
    scope: Mapping[str, Any],
) -> Served | None:
    partial: str | None = None
    # Starlette's routers give a websocket to websocket routes (and mounts) alone, an
    # HTTP request to the others: a websocket route has no methods to match
    websocket = scope.get("type") == "websocket"
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
                return inner._replace(host=pattern + inner.host)
            # Starlette routes it to this host's app whatever the path (a Host match is
            # full): later routes never see it; its 404 (or the app of its own) is the
            # host's, as a mount's is `<mount>/*`. No path template: no `http.route`.
            return Served(pattern, "/*", None, _HOST_MISS)
        regex = getattr(route, "path_regex", None)
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if regex is None or path is None:
            continue  # a route type of its own: no path template to use
        is_mount = _is_mount(route)
        if not is_mount and _is_websocket_route(route) is not websocket:
            continue  # a websocket route never serves an http request, nor an http one a socket
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
            prefix = str(getattr(route, "path", "") or "")
            if inner is not None:
                # (a Host inside the mount: its pattern still leads the name)
                template = None if inner.template is None else prefix + inner.template
                return Served(inner.host, prefix + inner.path, template, inner.route)
            # an app of its own (or no route of it matches): named `<mount>/*`; its path
            # template is the one the Mount itself routes by (`/api/{path:path}`; a root
            # mount's, whose `path` is "", `/{path:path}`)
            return Served("", f"{path}/*", f"{prefix}/{{path:path}}", None)
        methods = None if websocket else route.methods
        if methods and method not in methods:
            if partial is None:
                partial = str(path)  # method not allowed: same route, other verb
            continue
        return Served("", str(path), str(path), route)
    return None if partial is None else Served("", partial, partial, None)


def _router_of(app: object) -> Any:
    """The router of a Starlette/FastAPI app (the app itself for a bare `Router`)."""
    return getattr(app, "router", app)


def _mounted_router(route: Any) -> Any:
    """The router of the app a `Mount` or `Host` passes requests to, or None. A mount's
    `app` is its router wrapped in the mount's middleware when it has some; Starlette keeps
    the router itself as `_base_app` then."""
    for app in (getattr(route, "app", None), getattr(route, "_base_app", None)):
        router = _router_of(app)
        if router is not None and hasattr(router, "redirect_slashes"):
            return router
    return None


def slash_redirect(scope: Mapping[str, Any], fallback_app: object = None) -> bool:
    """Will one of the app's routers answer `scope` with its own trailing-slash redirect?
    (Starlette's `redirect_slashes`, on by default: no route of the router that gets the
    request serves the path, and one serves it with the final slash added or taken off,
    whatever its method.) That router is the app's own, or the one of the mounted app or
    router, or of the `Host`, that the request goes on to: a mount's own redirect
    (`/api/items/` to `/api/items` under `Mount("/api")`) is one as much as the top's."""
    if scope.get("type") == "websocket":
        return False  # Starlette redirects HTTP requests alone
    try:
        return _redirects(_router_of(scope.get("app") or fallback_app), route_path(scope), scope)
    except Exception:  # a third-party route object with odd attributes
        return False


def _redirects(router: Any, route_path: str, scope: Mapping[str, Any], depth: int = 0) -> bool:
    """Does `router`, seeing `route_path` (the rest of the path, under a mount), redirect?"""
    routes = getattr(router, "routes", None)
    if not routes or route_path == "/":
        return False
    method = scope.get("method")
    # Which of this router's routes takes the request, as Starlette's router picks it:
    # the first that matches in full (a mount or a host: whatever the method), else the
    # first that matches the path alone (a 405, not a redirect).
    partial = False
    for route in flat_routes(routes):
        host_regex = getattr(route, "host_regex", None)
        if host_regex is not None and getattr(route, "path_regex", None) is None:
            if depth >= _MAX_MOUNT_DEPTH or host_regex.match(_host(scope)) is None:
                continue
            inner = _mounted_router(route)  # the host's app sees the whole path
            return inner is not None and _redirects(inner, route_path, scope, depth + 1)
        regex = getattr(route, "path_regex", None)
        if regex is None:
            continue
        is_mount = _is_mount(route)
        if not is_mount and _is_websocket_route(route):
            continue
        found = regex.match(route_path)
        if found is None:
            continue
        if is_mount:
            rest = found.groupdict().get("path")
            inner = _mounted_router(route)
            return (
                rest is not None
                and inner is not None
                and depth < _MAX_MOUNT_DEPTH
                and _redirects(inner, "/" + rest, scope, depth + 1)
            )
        methods = route.methods
        if methods and method not in methods:
            partial = True  # a 405, unless a later route (a mount) takes it in full
            continue
        return False  # a route of this router's serves it
    # No route takes it: this router redirects when it is on and the other form is routed.
    if partial or getattr(router, "redirect_slashes", False) is not True:
        return False
    other = route_path.rstrip("/") if route_path.endswith("/") else route_path + "/"
    there = _serving(routes, other, method, depth, scope)
    # (under a `Host`: its app's router redirects what none of its routes serve)
    return there is not None and there.route is not _HOST_MISS
