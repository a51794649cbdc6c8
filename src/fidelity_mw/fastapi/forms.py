"""`Fidelity`: the FastAPI forms of one application, and where they find their engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, cast

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from .._types import Clock, RandomSource
from ..clock import TESTING
from ..context import (
    DecisionContext,
    context_from_scope,
)
from ..engine import Engine, RoutePlan
from ..errors import PolicyError
from ..headers import client_address
from ..inbound.request import NO_PEER
from ..inbound.websocket import CLOSE_TRY_AGAIN_LATER, DENIAL_EXTENSION, refusal_reason
from ..overrides import mark
from ..policy import BreakerConfig, Policy
from ..rejections import (
    PROBLEM_MEDIA_TYPE,
    OnReject,
    call_on_reject,
    checked_on_reject,
    keep_headers,
)
from ..routes import flat_routes
from ..state.base import StateStore
from .exceptions import Rejected
from .limit import CostFunc, KeyDep, KeyFunc, LimitDependency
from .openapi import document, problem_responses
from .routing import route_class_for

_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger("fidelity_mw")
# In a request's scope, where it entered the app `install` was given (that app, its root
# path) when no FidelityMiddleware is on it: `Fidelity.plan` names its routes from there
_ENTRY: Final = "fidelity_mw.forms.entry"


# ---------------------------------------------------------------- Fidelity


def _mounted_apps(routes: Any, prefix: str = "", depth: int = 0) -> list[tuple[FastAPI, str]]:
    """The FastAPI apps mounted among `routes` (`Mount`, `Host`), at any depth, each with
    the path it is mounted at."""
    found: list[tuple[FastAPI, str]] = []
    if depth > 16:
        return found
    for route in routes or ():
        sub = getattr(route, "app", None)
        if not hasattr(route, "routes") or sub is None:
            continue  # not a Mount or a Host
        at = prefix + str(getattr(route, "path", "") or "")
        if isinstance(sub, FastAPI):
            found.append((sub, at))
        found += _mounted_apps(getattr(sub, "routes", None), at, depth + 1)
    return found


def _has_middleware(app: Any) -> bool:
    """Whether a FidelityMiddleware was added to `app` (`add_middleware`)."""
    from ..inbound import FidelityMiddleware

    for entry in getattr(app, "user_middleware", ()):
        cls = getattr(entry, "cls", None)
        if isinstance(cls, type) and issubclass(cls, FidelityMiddleware):
            return True
    return False


def _middleware_policies(app: Any) -> list[Policy]:
    """The policies of the FidelityMiddleware entries added to `app` (`add_middleware`)."""
    from ..inbound import FidelityMiddleware

    found: list[Policy] = []
    for entry in getattr(app, "user_middleware", ()):
        cls = getattr(entry, "cls", None)
        if isinstance(cls, type) and issubclass(cls, FidelityMiddleware):
            kwargs = dict(getattr(entry, "kwargs", {}))
            policy = kwargs.get("policy") or getattr(kwargs.get("engine"), "policy", None)
            if isinstance(policy, Policy):
                found.append(policy)
    return found


class Fidelity:
    """The FastAPI forms of one application. Create one, share it between routers.

    `document_middleware=True`: the OpenAPI schema also lists the 503 (route breaker,
    bulkhead) and 504 (deadline) the app's FidelityMiddleware can answer on each route,
    as its policy says (off by default: see docs/fastapi.md, "OpenAPI")."""

    def __init__(
        self,
        app: FastAPI | None = None,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        on_reject: OnReject | None = None,
        document_middleware: bool = False,
    ) -> None:
        self._engine = engine
        # Off by default: turning it on adds 503/504 to nearly every route's schema (the
        # default policy has a route breaker and a deadline), which changes the OpenAPI
        # documents, generated clients and schema tests of apps that work today.
        self.document_middleware = document_middleware
        self._engine_args: tuple[Policy | None, Clock | None, RandomSource | None] = (
            policy,
            clock,
            rng,
        )
        self._store = store
        # the fake_time() block open when this was made (None: none), for `engine`
        self._made_in = TESTING.current
        # A policy (or engine) given here that the middleware's overrides: said once, at
        # the first request the middleware decided (as FidelityTransport says it)
        self._own_policy: Policy | None = engine.policy if engine is not None else policy
        self.on_reject = checked_on_reject(on_reject, "Fidelity")
        self._no_peer_said = False
        self._named: dict[str, LimitDependency] = {}  # fidelity.limit(name=...) by name
        self._alone_said = False  # a policy's [[rate_limit]] entries without the middleware
        self.route_class: type[APIRoute] = route_class_for(self)
        if app is not None:
            self.install(app)

    # ------------------------------------------------------------ engine and context

    @property
    def engine(self) -> Engine:
        """The engine used where no middleware provides one (created on first use)."""
        if self._engine is None:
            policy, clock, rng = self._engine_args
            block = TESTING.current
            if block is None or block is self._made_in:
                self._engine = Engine(policy, clock=clock, rng=rng, store=self._store)
            else:
                # First used inside a test's fake_time() block, made before it (at
                # import): built as it would have been when made, then the block takes
                # it over and gives it back when it ends (fidelity_mw.testing). Built on
                # the block's clock, it kept that stopped clock and the block's state
                # after it: a limit that never refilled in the tests that followed.
                TESTING.current = self._made_in
                try:
                    engine = Engine(policy, clock=clock, rng=rng, store=self._store)
                finally:
                    TESTING.current = block
                from ..testing import adopt_engine

                adopt_engine(engine)
                self._engine = engine
        return self._engine

    def context(self, request: HTTPConnection) -> DecisionContext:
        """The request's decision context: the middleware's, else one of our own (a
        websocket's too: the middleware lets websockets by undecided; its handshake is
        a GET)."""
        ctx = context_from_scope(request.scope)
        if ctx is not None:
            if self._own_policy is not None:
                self._overridden(ctx.engine)
            return ctx
        engine = self.engine
        if not self._alone_said:
            self._alone_said = True
            if engine.policy.rate_limits:
                logger.warning(
                    "fidelity_mw: Fidelity(policy=...) serves a request without "
                    "FidelityMiddleware: the policy's %d [[rate_limit]] entries apply only "
                    "behind the middleware (app.add_middleware(FidelityMiddleware, "
                    "policy=...)); without it, declare limits with fidelity.limit "
                    "(docs/fastapi.md)",
                    len(engine.policy.rate_limits),
                )
        scope = request.scope
        method = scope.get("method") or "GET"
        plan = self.plan(scope)
        ctx = DecisionContext(engine, plan.route, method, engine.clock.monotonic())
        state = request.scope.setdefault("state", {})
        state["fidelity"] = ctx
        return ctx

    def plan(self, scope: Mapping[str, Any]) -> RoutePlan:
        """The plan of a request no middleware decided, on this engine: as the installed
        app sees it (`_ENTRY`), so a route of a mounted app is named by its whole path
        (`/v1/orders`), as the middleware names it. Named from the mounted app alone,
        `/v1/orders` and `/v2/orders` were one route `/orders`: one breaker (one app's
        failures shed the other's requests) and one default limit counter."""
        entry = scope.get(_ENTRY)
        if entry is not None:
            # under a Mount (of an app, or of a router's routes: `root_path` then holds
            # the mount's path, and the route path alone matched no route of the app's)
            if entry[0] is not scope.get("app") or entry[1] != scope.get("root_path", ""):
                scope = {**scope, "app": entry[0], "root_path": entry[1]}
        elif "app_root_path" in scope and scope.get("router") is not None:
            # not installed: the outermost router, and the root path before any Mount
            # (Starlette's), as `check_limits` routes a mounted request
            scope = {**scope, "app": scope["router"], "root_path": scope["app_root_path"]}
        if "method" not in scope:  # (a websocket's handshake is a GET)
            scope = {**scope, "method": "GET"}
        return self.engine.plan_for(scope)

    def _overridden(self, engine: Engine) -> None:
        """The forms run behind the middleware, on its engine: a policy given here with
        other settings (its state URL, its rate-limit fields) applies nowhere."""
        own = self._own_policy
        self._own_policy = None  # asked once
        if own is None or engine is self._engine or engine.policy.version == own.version:
            return
        logger.warning(
            "fidelity_mw: Fidelity(policy=...) is used behind FidelityMiddleware, whose "
            "policy differs (version %s, not %s): the forms count on the middleware's engine, "
            "with its policy and state; give the middleware this policy (docs/fastapi.md)",
            engine.policy.version,
            own.version,
        )

    def client_ip(
        self, request: HTTPConnection, engine: Engine, ipv6_prefix: int | None = None
    ) -> str:
        """The client key of `key = "client_ip"`: the peer (or the address the trusted
        proxies forwarded), an IPv6 one as its `client_ipv6_prefix` network (the limit's
        own `ipv6_prefix`, else the policy's), as the middleware keys it."""
        client = request.client
        peer = client.host if client else None
        if peer is None:
            return self._no_peer()
        if engine.trusted_proxies:
            header = engine.policy.forwarded_header
            # Every line, joined as the middleware joins them: a proxy that adds a line of
            # its own leaves the client's line first, and `get` read that one alone.
            lines = request.headers.getlist(header)
            peer = client_address(
                peer,
                ",".join(lines).encode("latin-1") if lines else None,
                engine.trusted_proxies,
                header,
            )
        return engine.client_keys.at(ipv6_prefix).key(peer)

    def _no_peer(self) -> str:
        """The client key of a request without a client address, said once (as the
        middleware says it): every such request is one client."""
        if not self._no_peer_said:
            self._no_peer_said = True
            logger.warning(
                "fidelity_mw: a request came without a client address (request.client is "
                'None: a server on a unix socket); fidelity.limit(key="client_ip") counts '
                "every such request as one client, %r, and neither X-Forwarded-For nor "
                "Forwarded can be believed without a peer address. Behind a proxy on a unix "
                "socket, key the limit by a header the proxy sets itself "
                '(key="header:x-real-ip" with nginx\'s proxy_set_header X-Real-IP '
                "$remote_addr), or serve on TCP",
                NO_PEER,
            )
        return NO_PEER

    # ------------------------------------------------------------ the forms

    def limit(
        self,
        rate: str,
        *,
        key: str | KeyFunc | KeyDep = "client_ip",
        burst: int | None = None,
        cost: int | CostFunc = 1,
        name: str | None = None,
        shadow: bool = False,
        client_ipv6_prefix: int | None = None,
    ) -> LimitDependency:
        """A rate limit for `Depends(...)`: `rate` like `"10/s"`, keyed by `key`.

        `key`: `client_ip` (default), `header:<name>` (the client's IP when the
        header is missing), `route`, `global`, a function (or coroutine
        function) of the request returning a key (None: the IP), or a FastAPI
        dependency, `Depends(current_user)`, whose value is the key (None: the IP).
        `cost`: the units each request takes, or a function (or coroutine
        function) of the request returning them (a batch: its length): a whole
        number >= 0; 0 takes nothing, more than the burst is refused at once.
        `client_ipv6_prefix`: this limit's own IPv6 prefix for its client keys (32 ..
        128; None: the policy's), as a `[[rate_limit]]`'s.
        """
        limit = LimitDependency(self, rate, key, burst, cost, name, shadow, client_ipv6_prefix)
        if name is not None:
            # One name is one counter (routes share it by name): two rates on it would
            # fight over its state, and the slower refuse the faster's requests.
            other = self._named.setdefault(name, limit)
            if other is not limit and (other.burst_size, other.interval_s) != (
                limit.burst_size,
                limit.interval_s,
            ):
                raise PolicyError.at(
                    f"fidelity.limit({rate!r}).name",
                    f"{name!r} is already the counter of fidelity.limit({other.rate!r}, burst "
                    f"{other.burst_size}): limits that share a name share one counter, so "
                    "they need the same rate and burst; give this one another name",
                )
        return limit

    def breaker(
        self, config: BreakerConfig | bool | None = None, **fields: Any
    ) -> Callable[[_F], _F]:
        """This endpoint's breaker: a `BreakerConfig`, its fields as keywords, or False (none).

        Decorate the endpoint function below the route decorator.
        """
        if config is None:
            try:
                config = BreakerConfig(**fields)
            except PolicyError as exc:
                raise exc.prefixed("fidelity.breaker") from None
        elif fields:
            raise TypeError("pass a BreakerConfig or its fields as keywords, not both")
        elif not isinstance(config, BreakerConfig | bool):
            # Refused here, not per request: the route's plan could not be built from it,
            # and the middleware let every request of the route through undecided (its
            # limits and deadline too); the route class answered each with a 500.
            fix = (
                f"its fields as keywords, fidelity.breaker(**{config!r})"
                if isinstance(config, Mapping)
                else "a BreakerConfig, its fields as keywords, or False for none"
            )
            raise PolicyError.at(
                "fidelity.breaker",
                f"expected a BreakerConfig, true or false, got {type(config).__name__}: pass {fix}",
            )

        def decorate(endpoint: _F) -> _F:
            return mark(endpoint, breaker=config)

        return decorate

    def deadline(self, ms: int) -> Callable[[_F], _F]:
        """This endpoint's deadline in ms: the default, and the most a caller may ask for."""
        if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= 86_400_000:
            # a PolicyError (a ValueError, as before), as the other forms' bad arguments
            raise PolicyError.at(
                "fidelity.deadline", f"expected a whole number of ms 1 .. 86400000, got {ms!r}"
            )

        def decorate(endpoint: _F) -> _F:
            return mark(endpoint, deadline_ms=ms)

        return decorate

    @staticmethod
    def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI entries for a route's `responses=` (default: 429, 503 and 504)."""
        return problem_responses(*(statuses or (429, 503, 504)))

    # ------------------------------------------------------------ the app

    def install(self, app: FastAPI) -> None:
        """RFC 9457 responses for `Rejected` (unless the app has its own handler for it),
        and 429/503/504 in the OpenAPI of every route that uses a form; the same for the
        FastAPI apps mounted on it (`app.mount("/v2", v2)`), those mounted later too."""
        self._install_one(app)
        for sub, at in _mounted_apps(app.routes):
            self._install_one(sub, app, at)
        self._adopt_on_reject(app)
        # A mounted app answers its own exceptions and serves its own schema: without its
        # handler, a form's 429 there came in FastAPI's `{"detail": ...}` shape. Mounts
        # made after this call (`Fidelity(app)` runs it when the app is created) are
        # installed when the app builds its stack, before its first request.
        build = app.build_middleware_stack

        def build_middleware_stack() -> Any:
            for sub, at in _mounted_apps(app.routes):
                self._install_one(sub, app, at)
            self._adopt_on_reject(app)  # a middleware added after this call
            stack = build()
            if _has_middleware(app):
                return stack  # (it decides every request, and names its routes)

            async def entry(scope: Any, receive: Any, send: Any) -> None:
                # Where the request entered this app, for `plan` (a mounted app sets
                # scope["app"] and "root_path" to its own): the outermost installed app
                if _ENTRY not in scope:
                    scope[_ENTRY] = (app, scope.get("root_path", ""))
                await stack(scope, receive, send)

            return entry

        app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]

    def _adopt_on_reject(self, app: FastAPI) -> None:
        """Without a hook of its own, take the `on_reject` of the app's FidelityMiddleware:
        one hook for every rejection, as docs/fastapi.md says, also where the app gave it
        to the middleware alone (the forms' 429s came as RFC 9457 next to the hook's
        bodies for the middleware's own)."""
        if self.on_reject is not None:
            return
        from ..inbound import FidelityMiddleware

        for entry in getattr(app, "user_middleware", ()):
            cls = getattr(entry, "cls", None)
            if isinstance(cls, type) and issubclass(cls, FidelityMiddleware):
                hook = dict(getattr(entry, "kwargs", {})).get("on_reject")
                if hook is not None:
                    self.on_reject = hook
                    return

    def _install_one(self, app: FastAPI, parent: FastAPI | None = None, at: str = "") -> None:
        """Install on `app`, mounted at `at` on `parent` (whose middleware's limits see
        the mounted routes' paths with `at` before them)."""
        if Rejected not in app.exception_handlers:
            app.add_exception_handler(Rejected, self.handle_rejected)  # type: ignore[arg-type]
        if getattr(app.openapi, "_fidelity_documents", False):
            return  # installed already (by this Fidelity or another)
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                # the [[rate_limit]] tables of the middleware on this app, and on the app
                # it is mounted on: read when the schema is made, after add_middleware
                limits = [(policy, "") for policy in _middleware_policies(app)]
                limits += [(policy, at) for policy in _middleware_policies(parent)]
                for route in flat_routes(app.routes):
                    if isinstance(getattr(route, "original_route", route), APIRoute):
                        document(route, policies=limits, refusals=self.document_middleware)
            return generate()

        openapi._fidelity_documents = True  # type: ignore[attr-defined]
        app.openapi = openapi  # type: ignore[method-assign]

    async def handle_rejected(self, request: Request, exc: Rejected) -> Response | None:
        """The default handler: the `on_reject` hook's response, else RFC 9457. A
        websocket's handshake on a server without the denial extension is closed instead
        (1013, as the middleware closes its own refusals there: docs/inbound.md): a
        response would be `websocket.http.response.*` messages such a server does not
        take, and the client got the server's error in place of the refusal."""
        headers = dict(exc.headers or {})
        scope = request.scope
        if scope.get("type") == "websocket" and DENIAL_EXTENSION not in (
            scope.get("extensions") or {}
        ):
            wait = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
            reason = refusal_reason(exc.status_code == 429, wait)
            close = {"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER, "reason": reason}
            await cast(WebSocket, request).send(close)
            return None
        if self.on_reject is not None:
            custom = await call_on_reject(self.on_reject, exc.ctx, exc.decision)
            if custom is not None:
                return keep_headers(
                    custom,
                    [
                        (k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()
                    ],
                )
        headers.setdefault("Cache-Control", "no-store")
        return JSONResponse(
            exc.problem, exc.status_code, headers=headers, media_type=PROBLEM_MEDIA_TYPE
        )
