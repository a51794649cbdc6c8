"""The routes of an app as a flat list, whatever the framework version nests."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


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
