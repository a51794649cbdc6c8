"""`Depends(fidelity.limit(...))`: one GCRA limit on a route, in the request's decision context."""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, cast

from fastapi import Request, Response
from fastapi import params as fastapi_params
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from starlette.exceptions import HTTPException, WebSocketException
from starlette.requests import ClientDisconnect, HTTPConnection

from .._logs import exception as log_exception
from .._logs import warn
from ..context import (
    ALLOW,
    LAYER_RATELIMIT,
    LAYER_STATE,
    REJECT,
    SOURCE_FALLBACK,
    SOURCE_REQUEST,
    WOULD_REJECT,
    DecisionContext,
    DetailValue,
)
from ..decide.gcra import policy_field
from ..engine import Engine, RoutePlan, sf_string_content
from ..errors import PolicyError
from ..inbound.admission import quota_wait_s, warn_without_state
from ..inbound.checks import LimitCheck, peek_limits
from ..inbound.request import text_is_address
from ..inbound.responses import refusal_retry_after, state_unavailable_detail
from ..inbound.xratelimit import x_ratelimit_fields
from ..policy import RateLimit
from ..rejections import (
    problem_document,
)
from ..routes import flat_routes
from ..state.base import LimitSpec, state_age_s, state_why
from .exceptions import RateLimited, Rejected

_X_RATELIMIT: Final = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")

logger = logging.getLogger("fidelity_mw")


class FormsOwner(Protocol):
    """What a form needs of its `Fidelity` (a protocol: forms.py imports this module)."""

    @property
    def engine(self) -> Engine: ...

    def context(self, request: HTTPConnection) -> DecisionContext: ...

    def plan(self, scope: Mapping[str, Any]) -> RoutePlan: ...

    def client_ip(
        self, request: HTTPConnection, engine: Engine, ipv6_prefix: int | None = None
    ) -> str: ...


_MAX_KEY_CHARS: Final = 64
# Where a request's admitted form limits note what they charged (in its ASGI scope, one
# list per request): a later form limit that refuses the request gives those units back
_CHARGED: Final = "fidelity_mw.forms.charged"
# The unnamed form limits a request met, by default name (in its ASGI scope): a second
# one of the same route at the same rate counts apart (`_default_name`)
_UNNAMED: Final = "fidelity_mw.forms.unnamed"
# What a cost function may raise that is no failure of it: the app's answer to the
# request, or the client gone while it read the body (the middleware's to record)
_APP_ANSWERS: Final = (
    HTTPException,
    WebSocketException,
    RequestValidationError,
    WebSocketRequestValidationError,
    ClientDisconnect,
)


# ---------------------------------------------------------------- the limit dependency


# A key or a cost from the request; either may be a coroutine function (an auth lookup,
# `await request.json()` for a batch's size).
KeyFunc = Callable[[Request], str | Awaitable[str | None] | None]
# a key from a FastAPI dependency: `key=Depends(current_user)` (its value, as text)
KeyDep = fastapi_params.Depends
CostFunc = Callable[[Request], int | Awaitable[int]]


class LimitDependency:
    """`Depends(fidelity.limit(...))`: one GCRA limit on this route, per client key.

    The counter is named `name` (default: the route template and the rate), so
    routes that pass the same `name` share one counter per client key.
    """

    def __init__(
        self,
        owner: FormsOwner,
        rate: str,
        key: str | KeyFunc | KeyDep,
        burst: int | None,
        cost: int | CostFunc,
        name: str | None,
        shadow: bool,
        client_ipv6_prefix: int | None = None,
    ) -> None:
        # `key=Depends(current_user)`: FastAPI resolves it (once per request, shared
        # with the endpoint's own `Depends(current_user)`), whatever the order of the
        # route's dependencies; the dependency's signature says so.
        self.key_dep: KeyDep | None = None
        plain: str | KeyFunc
        if isinstance(key, fastapi_params.Depends):
            self.key_dep, plain = key, "client_ip"  # (the fallback of an identity that is None)
        else:
            plain = key
        self.__signature__ = _signature(self.key_dep)
        # Validated like a policy entry: a bad rate fails at import, not per request.
        # A cost function is checked per request (`_cost_of`): the bound is the burst.
        try:
            checked = RateLimit(
                # (name="" checked as given: it counted every route's requests on one
                # counter, "", whatever their rates)
                name="depends" if name is None else name,
                rate=rate,
                burst=burst,
                cost=1 if callable(cost) else cost,
                key="client_ip" if callable(plain) else plain,
                shadow=shadow,
                client_ipv6_prefix=client_ipv6_prefix,
            )
        except PolicyError as exc:  # named as written, not as a policy's unnamed entry
            raise exc.prefixed(f"fidelity.limit({rate!r})") from None
        self.owner = owner
        self.rate = checked.rate  # (tidied: " 5/s" counts on the counter "5/s" names)
        self.key = plain
        self.name = name
        self.shadow = shadow
        # this limit's own IPv6 prefix for client keys (None: the policy's)
        self.ipv6_prefix = client_ipv6_prefix
        self.burst_size = checked.burst_size
        interval = checked.emission_interval_s
        self.interval_s = interval
        self.tolerance_s = checked.burst_size * interval
        self.cost_fn: CostFunc | None = cost if callable(cost) else None
        self.cost = 1 if callable(cost) else cost
        # The engine whose policy `counter` was last checked against, and what this limit
        # counts on there: its name, or (a policy [[rate_limit]] of that name counting at
        # another rate) a counter of its own (`_counter_for`).
        self._checked: Engine | None = None
        self._counter = name or ""
        # default name -> the name this limit counts on there, where another unnamed
        # limit of the route at the same rate came first (`_default_name`; for `check`),
        # per engine: each middleware names the routes of the app it wraps, so an outer
        # app's `/export` and a mounted app's (its own middleware) share a name, not a place
        self._apart_by: weakref.WeakKeyDictionary[Engine, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<fidelity limit {self.rate} key={self.key!r} name={self.name!r}>"

    async def __call__(
        self, request: HTTPConnection, response: Response, identity: object = None
    ) -> None:
        # (HTTPConnection: FastAPI passes a websocket route's WebSocket here too, where
        # `Request` left the parameter unfilled and every handshake a TypeError)
        owner = self.owner
        ctx = owner.context(request)
        engine = ctx.engine
        now = engine.clock.monotonic()
        name = self.name or self._default_name(request, ctx.route, engine)
        counter = name if self.name is None else self._counter_for(engine)
        cost = self.cost
        # the cost, when it is not 1, goes on every record of this limit
        costed: dict[str, DetailValue] = {}
        if self.cost_fn is not None:
            cost = await self._cost_of(request, name)
        if cost != 1 or self.cost_fn is not None:
            costed["cost"] = cost
        if cost == 0:  # (an empty batch) takes nothing: the store is not asked
            ctx.decide(
                LAYER_RATELIMIT, name, ALLOW, "zero_cost", source=SOURCE_REQUEST, at=now,
                details=costed,
            )  # fmt: skip
            return
        if cost > self.burst_size:
            if self._over_burst(ctx, name, cost, costed, now):
                await give_back(request, engine)
                raise self._over_burst_rejection(ctx, name, cost)
            return
        spec = LimitSpec(name, self.interval_s, self.tolerance_s, cost, self.shadow)
        value = await self._key_value(request, ctx, identity)
        if ctx.client_key is None and value[:2] in ("h:", "k:"):
            # an API key or identity, as the store keys it: the client key telemetry
            # hashes (`fidelity.client.key_hash`), so the admin page's row matches the
            # traces; an address the middleware's limits counted by stays (its rule)
            ctx.client_key = value
        try:
            result = await engine.store.admit(None, None, (f"{counter}|{value}",), (spec,), now)
        except Exception as exc:  # the middleware's rule for its own limits: `on_error`
            refused = self._state_failure(ctx, name, exc, now)
            if refused is not None:
                await give_back(request, engine)
                raise refused from None
            return
        verdict = result.limits[0]
        source, age = result.source, result.age_s
        if result.why is not None:  # the store decided without its state: why (every record)
            costed["fallback_why"] = result.why
        # The default name is the route template, which no policy check has seen: in the
        # fields it is an sf-string (a character latin-1 lacks made every request a 500)
        advertised = sf_string_content(name)
        policy = policy_field(advertised, self.burst_size, self.tolerance_s)
        # `t` as the middleware's fields say it: seconds until more quota (until the
        # request would be admitted, on a 429), so never past the Retry-After
        wait_s = quota_wait_s(verdict, spec)
        # a refusal's Retry-After as every refusal of ours says it (at least 1, whole
        # seconds rounded up: responses.refusal_retry_after), the fields' `t` no later
        after = refusal_retry_after(verdict.retry_after_s)
        if not verdict.allowed:
            wait_s = min(wait_s, int(after))
        t = math.ceil(wait_s - 1e-9)
        # the policy's `rate_limit_headers` (when) and `rate_limit_header_names` (which),
        # as for the middleware's own limits
        fields: dict[str, str] = {}
        when = engine.policy.rate_limit_headers
        names: str = engine.policy.rate_limit_header_names
        if when == "never" or (verdict.allowed and when == "on_reject"):
            names = ""
        if names in ("ietf", "both"):
            fields["RateLimit-Policy"] = policy
            fields["RateLimit"] = f'"{advertised}";r={verdict.remaining};t={t}'
        if names in ("x-ratelimit", "both"):
            wall = engine.clock.wall()
            for raw_name, raw_value in x_ratelimit_fields(spec, verdict.remaining, wait_s, wall):
                fields[raw_name.decode()] = raw_value.decode()
        if verdict.allowed:
            ctx.decide(
                LAYER_RATELIMIT,
                name,
                ALLOW,
                "under_limit",
                source=source,
                age_s=age,
                at=now,
                details={"remaining": verdict.remaining, **costed},
            )
            charged = request.scope.get(_CHARGED)
            if charged is None:
                charged = request.scope[_CHARGED] = []
            charged.append((f"{counter}|{value}", spec, result, verdict.tat))
            if not self.shadow:
                if (
                    "x-ratelimit-remaining" in fields
                    and "x-ratelimit-remaining" in response.headers
                ):
                    # another limit of the route set its three already: these are one
                    # limit's, never sent twice; the one closer to refusing stays, as
                    # among the middleware's own limits (inbound/appfields.py)
                    there = response.headers["x-ratelimit-remaining"]
                    if there.isdigit() and verdict.remaining < int(there):
                        for field in _X_RATELIMIT:
                            del response.headers[field]
                    else:
                        fields = {k: v for k, v in fields.items() if not k.startswith("x-")}
                for field, text in fields.items():
                    response.headers.append(field, text)
            return
        wait = round(verdict.retry_after_s, 3)
        if self.shadow:
            ctx.decide(
                LAYER_RATELIMIT,
                name,
                WOULD_REJECT,
                "over_limit_shadow",
                source=source,
                age_s=age,
                at=now,
                details={"retry_after_s": wait, "shadow": True, **costed},
            )
            return
        decision = ctx.decide(
            LAYER_RATELIMIT,
            name,
            REJECT,
            "over_limit",
            source=source,
            age_s=age,
            at=now,
            details={"retry_after_s": wait, "remaining": 0, **costed},
        )
        # The 429 is this limit's decision: the middleware reports it so, and its own
        # limits give back what they charged (one layer's rejection costs no quota of
        # another), as do the route's other form limits that admitted it before this one.
        ctx.shed_by = LAYER_RATELIMIT
        await give_back(request, engine)
        problem = problem_document(
            429,
            "Too Many Requests",
            f"rate limit {name!r} exceeded; retry in {after} s",
            "rate-limited",
            limit=name,
        )
        raise RateLimited(429, problem, {"Retry-After": after, **fields}, ctx, decision)

    async def check(
        self,
        request: HTTPConnection,
        *,
        cost: int | None = None,
        route: str | None = None,
        identity: object = None,
    ) -> LimitCheck:
        """Would this client's next request be admitted by this limit now? Check without
        counting (limits' `test()`): the same key, counter and state as the dependency,
        and nothing charged, spent or recorded.

        `cost`: the units that request would take (default: the dependency's `cost`,
        its function applied to `request`). `route`: the route whose counter to ask,
        when the limit has no `name` and `request` is another route's (a `GET /quota`
        asking about `POST /export`): its identity, as the default name uses it (the
        `[[route]]` name, else the route template such as `/export`). `identity`: for a
        limit keyed by a dependency (`key=Depends(current_user)`), its value for this
        client (the check resolves no dependency).
        """
        if self.key_dep is not None and identity is None:
            raise TypeError(
                f"{self!r} is keyed by a dependency: pass its value, check(request, identity=...)"
            )
        ctx = self.owner.context(request)
        if self.name is None:
            name = default_name(route or ctx.route, self.rate)
            apart = self._apart(ctx.engine).get(name)
            if apart is None:
                name = self._placed_name(request, name, route, ctx.engine, ctx.route)
            else:
                name = apart
        else:
            name = self.name
        counter = name if self.name is None else self._counter_for(ctx.engine)
        if cost is None:
            cost = self.cost if self.cost_fn is None else await self._cost_of(request, name)
        # (keyed by `route`: the route asked about, not the one asking)
        value = await self._key_value(request, ctx, identity, route)
        spec = LimitSpec(name, self.interval_s, self.tolerance_s, cost, self.shadow)
        now = ctx.engine.clock.monotonic()
        keys = (f"{counter}|{value}",)
        return await peek_limits(ctx.engine, keys, (spec,), (self.burst_size,), now)

    def _apart(self, engine: Engine) -> dict[str, str]:
        """The places this limit learned under `engine`'s middleware (its route names)."""
        apart = self._apart_by.get(engine)
        if apart is None:
            apart = self._apart_by[engine] = {}
        return apart

    def _default_name(self, request: HTTPConnection, route: str, engine: Engine) -> str:
        """The name of this unnamed limit on `route`: `<route>:<rate>`, or, where another
        unnamed limit of the route at the same rate ran before it in this request (an
        app-wide `FastAPI(dependencies=[...])` one and the route's own), that name with
        `#2` (`#3` ...) after it, in the order FastAPI runs them. One name held both
        counts: at another burst the two fought over one GCRA state (every request of
        the route refused, its first too), at the same burst each request paid twice."""
        name = default_name(route, self.rate)
        met = request.scope.get(_UNNAMED)
        if met is None:
            request.scope[_UNNAMED] = {name: [self]}
            if self._apart_by:
                self._first_here(name, engine)
            return name
        limits = met.setdefault(name, [])
        if self not in limits:
            limits.append(self)
        place = limits.index(self)
        if place == 0:
            if self._apart_by:
                self._first_here(name, engine)
            return name
        apart = self._apart(engine)[name] = f"{name}#{place + 1}"
        return apart

    def _first_here(self, name: str, engine: Engine) -> None:
        """A request ran this limit first at its rate on the route: what `check` reads
        there is `name`, whatever was learned or read off the routes before (an app-wide
        limit a test's `dependency_overrides` took out since, say)."""
        apart = self._apart_by.get(engine)
        if apart is not None and apart.get(name, name) != name:
            apart[name] = name

    def _placed_name(
        self, request: HTTPConnection, name: str, route: str | None, engine: Engine, here: str
    ) -> str:
        """`name` (this unnamed limit's default on a route), or `name#2` ... where another
        unnamed limit at the same rate runs before it on that route, found on the app's
        routes before any request of the route taught it (`_default_name`): in a process
        that had served none, `check` read the first limit's counter, which shared state
        (Redis, a fleet) holds apart from this one's. The routes that run this limit
        (their dependencies in FastAPI's order, the app's `dependency_overrides` applied)
        agree on its place, or the one whose name is the route asked about decides; else
        `name`, as before. Read once per name (and engine: `here` is the check's own
        route as its middleware names it)."""
        scope = request.scope
        places: dict[str, int] = {}
        # The routes by their names as the middleware gives them: from the outermost
        # router (`/v1/export` of an app mounted at /v1, which a check inside the mounted
        # app sees as its own `/export`), then the app that serves the check by its own
        # paths (a middleware added to the mounted app names its routes so). The mounted
        # app's first when its own middleware serves the check (it names the check's own
        # route by the mounted app's path): an outer app's route of the same name is
        # another route, not the one asked about
        walks = [
            _app_routes(getattr(scope.get("router"), "routes", None)),
            _app_routes(_routes_of(scope)),
        ]
        serving = scope.get("route")
        if (
            serving is not None
            and not _names(walks[0], serving, here)
            and _names(walks[1], serving, here)
        ):
            walks.reverse()
        for walk in walks:
            for path, route_obj in walk:
                if path not in places:
                    place = _place_on(route_obj, self)
                    if place is not None:
                        places[path] = place
        if not places:
            return name  # not on this app's routes (another app's): nothing to learn
        found = set(places.values())
        asked = places.get(route) if route is not None else None
        if asked is None and len(found) > 1:
            return name
        place = asked if asked is not None else found.pop()
        placed = name if place == 0 else f"{name}#{place + 1}"
        return self._apart(engine).setdefault(name, placed)

    def _key_text(self, value: object) -> str | None:
        """The text a key function's or a key dependency's value counts by; None, said,
        for an object whose text is its address in memory (a class with no `__str__` or
        `__repr__` of its own, as an ORM model is: `current_user` returning the user row):
        a new key per request, so no limit at all. The address counts instead."""
        if not text_is_address(value):
            return str(value)
        kind = type(value)
        label = self.name or f"fidelity.limit({self.rate!r})"
        warn(
            logger, label, "fidelity_mw: the key of %s is a %s, whose text is its address in "
            "memory, new for every request: no limit at all, so the request counts by the "
            "client's address; return the identity's id (or give %s a __str__)", label,
            kind.__name__, kind.__name__, level=logging.ERROR,
        )  # fmt: skip
        return None

    def _counter_for(self, engine: Engine) -> str:
        """The counter this named limit keeps on `engine`: its name, which a policy
        [[rate_limit]] of the same name shares when it counts at the same rate and burst.
        At another rate the two specs fought over one state key (GCRA's theoretical
        arrival time: with a policy "default" of 100/min, a form "default" of 3/min
        refused a client's first request); the form then counts on a counter of its own,
        said once."""
        if engine is self._checked:
            return self._counter
        name = self.name
        assert name is not None
        counter = name
        for lim in engine.policy.rate_limits:
            if lim.name != name:
                continue
            same = lim.burst_size == self.burst_size and math.isclose(
                lim.emission_interval_s, self.interval_s
            )
            if not same:
                counter = f"{name}@form"
                logger.error(
                    "fidelity_mw: fidelity.limit(%r, name=%r) and the policy's [[rate_limit]] "
                    "%r count at different rates (%s, burst %d): one counter cannot hold "
                    "both, so the dependency counts on one of its own; give it another name, "
                    "or the same rate and burst to share the policy's",
                    self.rate,
                    name,
                    name,
                    lim.rate,
                    lim.burst_size,
                )
            break
        self._checked, self._counter = engine, counter
        return counter

    async def _cost_of(self, request: HTTPConnection, name: str) -> int:
        """The units this request takes, from the cost function: a whole number >= 0."""
        assert self.cost_fn is not None
        cost: object
        try:
            cost = self.cost_fn(cast(Request, request))
            if inspect.isawaitable(cost):
                cost = await cost
        except _APP_ANSWERS:
            raise  # the app's own answer (a 413 it raised, FastAPI's 422), a client gone
        except Exception:
            # What the client sent broke it (a body of valid JSON that is not the batch
            # the endpoint declares: FastAPI answers 422 after the dependencies): no 500
            # of ours for the route breaker to count. The cost is unknown: the request
            # takes the most one may, the burst (sending what the function cannot read
            # passes no limit).
            log_exception(
                logger, name, "fidelity_mw: the cost function of %r failed; the request "
                "costs the burst (%d)", name, self.burst_size,
            )  # fmt: skip
            return self.burst_size
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            # the app's bug, said loudly (and throttled) but not a 500 of ours for the
            # route breaker to count: the burst, as the middleware's own limits charge
            warn(
                logger, name, "fidelity_mw: the cost function of %r returned %r, not a whole "
                "number of units >= 0; the request costs the burst (%d)", name, cost,
                self.burst_size, level=logging.ERROR,
            )  # fmt: skip
            return self.burst_size
        return cost

    def _over_burst(
        self,
        ctx: DecisionContext,
        name: str,
        cost: int,
        costed: dict[str, DetailValue],
        now: float,
    ) -> bool:
        """A request costing more than the burst: no wait would ever admit it, so it is
        refused at once, without asking the store (and with no Retry-After: retrying the
        same request cannot help). Records the decision; True when it refuses (the caller
        gives back the units of the route's other form limits, then raises
        `_over_burst_rejection`), False for a shadow limit."""
        details: dict[str, DetailValue] = {**costed, "burst": self.burst_size}
        if self.shadow:
            ctx.decide(
                LAYER_RATELIMIT, name, WOULD_REJECT, "cost_over_burst_shadow",
                source=SOURCE_REQUEST, at=now, details={**details, "shadow": True},
            )  # fmt: skip
            return False
        ctx.decide(
            LAYER_RATELIMIT, name, REJECT, "cost_over_burst", source=SOURCE_REQUEST, at=now,
            details=details,
        )  # fmt: skip
        ctx.shed_by = LAYER_RATELIMIT
        return True

    def _over_burst_rejection(self, ctx: DecisionContext, name: str, cost: int) -> RateLimited:
        """The 429 `cost-over-burst` of the decision `_over_burst` recorded."""
        decision = ctx.decisions[-1]
        problem = problem_document(
            429,
            "Too Many Requests",
            f"this request costs {cost} units and rate limit {name!r} admits at most "
            f"{self.burst_size} at once: it is never admitted as it is; make it smaller",
            "cost-over-burst",
            limit=name,
            cost=cost,
            burst=self.burst_size,
        )
        advertised = sf_string_content(name)
        fields: dict[str, str] = {}
        policy = ctx.engine.policy
        if policy.rate_limit_headers != "never" and policy.rate_limit_header_names != "x-ratelimit":
            fields["RateLimit-Policy"] = policy_field(advertised, self.burst_size, self.tolerance_s)
        return RateLimited(429, problem, fields, ctx, decision)

    def _state_failure(
        self, ctx: DecisionContext, name: str, exc: Exception, now: float
    ) -> Rejected | None:
        """The store failed (Redis away under `on_error = "closed"`, say): decide as the
        middleware does for its own limits, not with the app's 500. "closed" answers 503
        `state-unavailable` (returned, for the caller to raise); otherwise the request
        goes on, and the record says why."""
        on_error = ctx.engine.policy.state.on_error
        if decide_without_state(
            ctx, LAYER_RATELIMIT, name, exc, now, refuse=on_error == "closed" and not self.shadow
        ):
            # not the route breaker's evidence, nor its quota; decided by the state's
            # absence (the limit is not exhausted), as the middleware's own refusal says
            ctx.shed_by = LAYER_STATE
            return state_unavailable(ctx)
        return None

    async def _key_value(
        self,
        request: HTTPConnection,
        ctx: DecisionContext,
        identity: object = None,
        route: str | None = None,
    ) -> str:
        key = self.key
        if self.key_dep is not None:
            if identity is not None:  # the dependency's value: the caller's identity
                text = self._key_text(identity)
                if text is not None:
                    return "k:" + _compact(text)
        elif key == "route":
            return "route:" + (route or ctx.route)
        if key == "global":
            return "*"
        if callable(key):
            try:
                # (a websocket's WebSocket has the headers and client a key reads, as a
                # Request)
                custom = key(cast(Request, request))
                if inspect.isawaitable(custom):  # a coroutine function (an auth lookup)
                    custom = await custom
            except _APP_ANSWERS:
                raise  # the app's own answer (a 401 its lookup raised), a client gone
            except Exception:
                # As the middleware does for its own key functions: the request counts by
                # its address, not a 500 of ours (a header the function indexed missing
                # failed every such request, and the route breaker counted each one).
                label = self.name or f"fidelity.limit({self.rate!r})"
                log_exception(
                    logger, label, "fidelity_mw: the key function of %s failed; the request "
                    "counts by the client's address", label,
                )  # fmt: skip
                custom = None
            if custom is not None:
                text = self._key_text(custom)
                if text is not None:
                    return "k:" + _compact(text)
        elif key.startswith("header:"):
            # the first line, as the middleware keys it: the value the app reads
            # (`Header()`, `request.headers[...]`), so a junk line after a valid key
            # is no fresh counter
            raw = request.headers.get(key[7:], "")
            if raw:
                if ":" in raw:  # an IPv6 address (`header:x-real-ip`): its prefix
                    raw = ctx.engine.client_keys.at(self.ipv6_prefix).key(raw)
                return "h:" + _compact(raw)
        ip = self.owner.client_ip(request, ctx.engine, self.ipv6_prefix)
        ctx.client_key = ip
        return ip


async def give_back(request: HTTPConnection, engine: Engine) -> None:
    """A form limit refuses the request: give back the units the route's form limits that
    admitted it before charged (`_CHARGED`), as the middleware's own limits get theirs
    back. A refusal costs no quota: without this, a client retrying against a route's
    tight limit spent its app-wide `Depends(fidelity.limit(..., name=...))` quota on
    requests that were never served, and was then refused everywhere. Best effort, as
    every refund: one that cannot reach the store is logged and dropped."""
    charged = request.scope.pop(_CHARGED, None)
    if not charged:
        return
    store = engine.store
    now = engine.clock.monotonic()
    for key, spec, result, tat in charged:
        try:
            if result.fleet is not None:  # said only when set: a store of the user's
                await store.refund((key,), (spec,), result.source, now, (tat,), fleet=result.fleet)
            else:
                await store.refund((key,), (spec,), result.source, now, (tat,))
        except Exception:
            log_exception(
                logger, "form_refund", "fidelity_mw: could not give back the units of %s", key
            )


def default_name(route: str, rate: str) -> str:
    """A limit's name when it is given none: `<route>:<rate>`, with any "|" of the route
    name written %7C. A limit's state key is "<name>|<client key>" and its records are
    split at the first "|" (the admin page, the decision summary): a `[[route]]` name
    may hold one, a limit name may not (policy names are refused with one)."""
    return f"{route.replace('|', '%7C')}:{rate}"


def _routes_of(scope: Mapping[str, Any]) -> Any:
    return getattr(scope.get("app"), "routes", None)


def _app_routes(
    routes: Any, prefix: str = "", host: str = "", depth: int = 0
) -> list[tuple[str, Any]]:
    """The routes of an app with their names as `routes.Served` gives them (the `Host`
    patterns, then the path with its mounts' prefixes), mounted apps' too."""
    found: list[tuple[str, Any]] = []
    if depth > 16:
        return found
    for route in flat_routes(routes or ()):
        if getattr(route, "dependant", None) is not None:
            found.append((host + prefix + str(getattr(route, "path", "") or ""), route))
        elif (
            getattr(route, "host_regex", None) is not None
            and getattr(route, "path_regex", None) is None
        ):
            # a Host: its pattern leads the name of every route of its app
            pattern = str(getattr(route, "host", "") or "")
            found += _app_routes(getattr(route, "routes", None), prefix, host + pattern, depth + 1)
        elif hasattr(route, "routes"):  # a Mount: the routes of its app, under its path
            path = prefix + str(getattr(route, "path", "") or "")
            found += _app_routes(getattr(route, "routes", None), path, host, depth + 1)
    return found


def _names(walk: list[tuple[str, Any]], route: Any, name: str) -> bool:
    """Does `walk` (`_app_routes`) give `route` the name `name`? (The route serving a
    request may be a copy of the one the app lists: the same endpoint then.)"""
    endpoint = getattr(route, "endpoint", None)
    return any(
        path == name
        and (
            found is route
            or (endpoint is not None and getattr(found, "endpoint", None) is endpoint)
        )
        for path, found in walk
    )


def _place_on(route: Any, limit: LimitDependency) -> int | None:
    """`limit`'s place among the unnamed limits at its rate that `route` runs, in the
    order FastAPI runs its dependencies (a dependency's own before it; one met again is
    run once, at its first place; one the app's `dependency_overrides` replaces, as its
    replacement); None when the route does not run it."""
    overrides = getattr(
        getattr(route, "dependency_overrides_provider", None), "dependency_overrides", None
    )
    same_rate: list[LimitDependency] = []
    stack: list[tuple[Any, bool]] = [(route.dependant, False)]
    top = True
    while stack:
        dependant, done = stack.pop()
        call = getattr(dependant, "call", None)
        if done:
            if (
                isinstance(call, LimitDependency)
                and call.name is None
                and call.rate == limit.rate
                and all(other is not call for other in same_rate)
            ):
                same_rate.append(call)
            continue
        if overrides and not top:
            replaced = _overridden(dependant, call, overrides)
            if replaced is not dependant:
                # (an override in a test, say, of an app-wide limit: a request runs the
                # replacement, and the route's own limit is the first at its rate)
                dependant, call = replaced, getattr(replaced, "call", None)
        top = False
        stack.append((dependant, True))
        for sub in reversed(getattr(dependant, "dependencies", None) or ()):
            stack.append((sub, False))
    for place, other in enumerate(same_rate):
        if other is limit:
            return place
    return None


def _overridden(dependant: Any, call: Any, overrides: Mapping[Any, Any]) -> Any:
    """The dependant FastAPI solves in place of `dependant` (`dependency_overrides`:
    the replacement's own, its dependencies included), or `dependant` itself."""
    try:
        replacement = overrides.get(call, call)
    except TypeError:  # an unhashable call: FastAPI's own lookup fails the same way
        return dependant
    if replacement is call:
        return dependant
    try:
        from fastapi.dependencies.utils import get_dependant

        return get_dependant(path=getattr(dependant, "path", "") or "", call=replacement)
    except Exception:  # another FastAPI's signature: the replacement alone, no dependencies
        return _Leaf(replacement)


class _Leaf:
    """A replacement dependency whose own dependencies could not be read."""

    dependencies: tuple[Any, ...] = ()

    def __init__(self, call: Any) -> None:
        self.call = call


def _signature(key_dep: object) -> inspect.Signature:
    """What FastAPI reads of the dependency: the connection, the response (for the
    fields), and with a dependency for its key, that dependency as `identity`."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        inspect.Parameter("request", kind, annotation=HTTPConnection),
        inspect.Parameter("response", kind, annotation=Response),
    ]
    if key_dep is not None:
        parameters.append(inspect.Parameter("identity", kind, default=key_dep))
    return inspect.Signature(parameters)


def _compact(value: str) -> str:
    """A huge key must not cost huge memory: long ones are hashed."""
    if len(value) <= _MAX_KEY_CHARS:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16)
    return "#" + digest.hexdigest()


def decide_without_state(
    ctx: DecisionContext, layer: str, subject: str, exc: Exception, now: float, refuse: bool
) -> bool:
    """Record a decision taken without the store (it failed): `refuse` it or let it by,
    as `state.on_error` says. Returns `refuse`."""
    warn_without_state(exc)
    ctx.decide(
        layer,
        subject,
        REJECT if refuse else ALLOW,
        f"state_error:{type(exc).__name__}",
        source=SOURCE_FALLBACK,
        age_s=state_age_s(ctx.engine.store),
        at=now,
        details=_without_state(ctx, exc),
    )
    return refuse


def _without_state(ctx: DecisionContext, exc: Exception) -> dict[str, DetailValue]:
    """The details of a decision taken without the store, as the middleware's own say:
    `on_error`, and why the store is without its state when it can say."""
    details: dict[str, DetailValue] = {"on_error": ctx.engine.policy.state.on_error}
    why = getattr(exc, "why", None) or state_why(ctx.engine.store)
    if why is not None:
        details["fallback_why"] = why
    return details


def state_unavailable(ctx: DecisionContext) -> Rejected:
    """The 503 of a policy that fails closed while the store is unreachable."""
    decision = ctx.decisions[-1]  # decide_without_state's, `fallback_why` among its details
    why = decision.details.get("fallback_why") if decision.details else None
    detail = state_unavailable_detail(why)  # as the middleware's own says it
    problem = problem_document(503, "Service Unavailable", detail, "state-unavailable")
    # decided by the state's absence, not by the layer whose state it was (the record's)
    return Rejected(503, problem, {"Retry-After": "1"}, ctx, decision, LAYER_STATE)
