"""The engine: one per middleware (or transport). Policy + clock + randomness + state.

It precomputes per-route plans so the per-request path is dictionary lookups
and arithmetic.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import PurePath
from typing import Any

from ._types import Clock, RandomSource
from .clock import SYSTEM_CLOCK, TESTING
from .decide.concurrency import ConcurrencyLimiter, ConcurrencySpec
from .headers import ClientKeys, networks
from .hooks import AttemptObserver, RequestObserver
from .overrides import endpoint_overrides
from .policy import (
    BreakerConfig,
    ConcurrencyConfig,
    Policy,
    RateLimit,
    RouteConfig,
    glob_matches,
)
from .policy.model import covers_method, names_head, redact_url
from .routeplan import RoutePlan as RoutePlan
from .routeplan import sf_string_content as sf_string_content
from .routes import (
    UNMATCHED,
    flat_routes,
    framework_route,
    route_path,
    serving_route,
    slash_redirect,
)
from .routes import _host as routes_host
from .state.base import StateStore, breaker_home
from .state.factory import store_from_policy

logger = logging.getLogger("fidelity_mw")

_MAX_PLANS = 10_000
# The plan cache's method for CORS preflights (no HTTP method has a space).
_PREFLIGHT = "OPTIONS preflight"
_MAX_KEY_CHARS = 64


def compact_key(key: str) -> str:
    """Client keys longer than 64 chars are hashed: a huge header must not cost huge memory."""
    if len(key) <= _MAX_KEY_CHARS:
        return key
    return "#" + hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _say_swapped(engine: Engine, before: object) -> None:
    """Log the policy swapped in, as the middleware logs the one it was built with; and
    when its `[state]` differs, that the store stays the one built: an operator who swapped
    in a Redis URL or another `on_error` otherwise had no sign the process still decides
    as before (the store is built once: a changed `[state]` takes a restart)."""
    policy = engine.policy
    old = before.version if isinstance(before, Policy) else "?"
    logger.info("fidelity_mw: policy %s swapped in (was %s)", policy.version, old)
    if isinstance(before, Policy) and policy.state != before.state:
        url = policy.state.url
        logger.warning(
            "fidelity_mw: the policy swapped in (%s) has another [state] (%s, on_error=%s): "
            "ignored, the state store stays the one built (%s); a changed [state] takes a "
            "restart (docs/operations.md, Changing the policy)",
            policy.version,
            redact_url(url) if url else "no url",
            policy.state.on_error,
            type(engine.store).__name__,
        )


def _not_a_policy(value: object) -> str:
    """`policy="fidelity.toml"` and `policy={...}` are natural guesses: name the fix."""
    if isinstance(value, str | PurePath):
        fix = f"Policy.from_toml({str(value)!r})"
    elif isinstance(value, Mapping):
        fix = "Policy.from_dict(...)"
    else:
        fix = 'Policy(...), Policy.from_toml("fidelity.toml") or Policy.from_dict(...)'
    return f"policy= takes a fidelity_mw.Policy, got {type(value).__name__}: pass {fix}"


class TransportSet(weakref.WeakSet[Any]):
    """The transports built on an engine, weakly. A sync transport's thread adds itself
    (a new plan built for this engine) while another reads the set (`_forget_breakers`
    after a resolver's answer, an engine change told to each transport, the admin
    page): a set changed while iterated raises. Adds and reads take one lock, and a
    read iterates a copy of the refs, made in one C call. Not `WeakSet`'s own
    iteration: a transport collected in another thread runs `WeakSet`'s callback there,
    without our lock (a lock taken in a weakref callback can deadlock the thread that
    holds it), and that callback checks whether anyone iterates, then discards: a read
    that began between the two saw the set change size under it."""

    def __init__(self, data: Iterable[Any] = ()) -> None:
        self._lock = threading.Lock()
        super().__init__(data)  # (its `update` adds through `add`: the lock first)

    def add(self, item: Any) -> None:
        with self._lock:
            super().add(item)

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            # `set.copy` runs no Python code (the refs' hashes are stored): no thread
            # switch and no callback inside it; the callbacks may discard from `data`
            # while the copy's refs are called
            refs: set[weakref.ref[Any]] = self.data.copy()  # type: ignore[attr-defined]
        members = [item for item in map(_deref, refs) if item is not None]
        return iter(members)


def _deref(ref: weakref.ref[Any]) -> Any:
    return ref()


class PolicyReader:
    """What a middleware reads a swapped-in policy with (`Engine.read_policy_with`). Its
    own object, not the middleware's bound method: compiled, the middleware is a native
    class, which takes no weak reference. The middleware holds it; the engine weakly."""

    __slots__ = ("__weakref__", "read")

    def __init__(self, read: Callable[[], None]) -> None:
        self.read = read


class Engine:
    """Shared by the middleware and the transports of one application."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
    ) -> None:
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(_not_a_policy(policy))
        self.policy = policy if policy is not None else Policy()
        # What the transports' upstream plans built under this engine and this policy are
        # marked with (`Upstream.mark`): a plan is this engine's only, never another
        # engine's that shares the Policy object (its store, its clock, what its balancer
        # learned there), and none survives a policy swapped in. Replaced on a swap.
        self.plan_mark: object = object()
        # Called when a policy is swapped in: what a middleware read of the policy once.
        # Weakly (`read_policy_with`): a middleware dropped is not kept alive by the engine.
        self.policy_readers: list[weakref.ref[PolicyReader]] = []
        defaulted = clock is None
        testing = TESTING.current  # a test's fake_time() block (fidelity_mw.testing)
        if testing is not None:
            clock = clock or testing[0]
            rng = rng or testing[1]
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.rng: RandomSource = rng or random.Random().random
        self.store: StateStore = store or store_from_policy(self.policy, self.rng, self.clock)
        self.trusted_proxies = networks(self.policy.trusted_proxies)
        self.trusted_peers = networks(self.policy.trusted_peers)
        # The client key of an address (`client_ipv6_prefix`), shared by every form
        self.client_keys = ClientKeys(self.policy.client_ipv6_prefix)
        self._plans: dict[tuple[str, str], RoutePlan] = {}
        # An app with Host routes: its plans by (method, path, host) (`_cached_plan`)
        self._by_host: bool | None = None
        self._host_plans: dict[tuple[str, str, str, object], RoutePlan] = {}
        # GET covers HEAD unless a limit (a route entry) names HEAD itself (covers_method)
        self._head_limits = names_head(self.policy.rate_limits)
        self._head_routes = names_head(self.policy.routes)
        # globs said to match only with the root path (`_say_root_path_globs`)
        self._root_globs_said: set[str] = set()
        # The routes whose breaker their endpoint's code declares (`overrides.py`), noted
        # as their plans are built: a policy swap clears the plans, not the code, so the
        # breaker gauge and the admin page keep these when the new policy has no breaker
        # for them (`admin.view.route_breaker_in_force`).
        self.coded_breakers: set[str] = set()
        # The app the middleware wraps: its routes name route identities when
        # `scope["app"]` is missing (the middleware wrapped the app directly).
        self.route_app: object | None = None
        # Set by the middleware / transports from `telemetry.py` (or by the user).
        self.request_observer: RequestObserver | None = None
        self.attempt_observer: AttemptObserver | None = None
        # One concurrency limiter per route with a bulkhead: process memory, its
        # only writer the middleware (plans come and go; the limiter stays).
        self.bulkheads: dict[str, ConcurrencyLimiter] = {}
        # Those of the policy before the last swap, taken up again where unchanged
        self._bulkheads_before: dict[str, ConcurrencyLimiter] = {}
        # The transports built on this engine (weakly: a closed client's goes away), so
        # the admin page can show their balancers' per-instance state (admin/view.py).
        self.transports: weakref.WeakSet[Any] = TransportSet()
        if defaulted:  # a later fake_time() block finds it (fidelity_mw.testing)
            TESTING.defaulted.add(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # A change of the engine (a policy swapped in, a test's clock and state): the
        # transports' shortcuts cached what they read of it per call (`_Armed.seen`),
        # and read it again at their next call. (Sets are rare; reads stay plain: never
        # `self.__dict__` here, which turns CPython 3.11's inline attribute values into a
        # dict whose reads its specializer cannot serve, so every `engine.x` of every
        # request went the generic way.)
        swapped = name == "policy" and hasattr(self, "plan_mark")
        if swapped and not isinstance(value, Policy):
            raise TypeError(_not_a_policy(value))
        before = getattr(self, "policy", None) if swapped else None
        object.__setattr__(self, name, value)
        if swapped:
            self.policy_swapped()
            _say_swapped(self, before)
        transports = getattr(self, "transports", None)
        if transports:
            for transport in list(transports):
                forget = getattr(transport, "engine_changed", None)
                if forget is not None:
                    forget(self)

    def policy_swapped(self) -> None:
        """`engine.policy = X` after construction: everything read of the policy once is
        read again, so the swap takes effect on the next request and call (route plans,
        limits, breakers, trusted proxies, upstream plans). The state store stays the one
        built: `[state]` takes a restart (docs/operations.md, "Changing the policy")."""
        policy = self.policy
        put = object.__setattr__  # (no transport told per field: once, by the caller)
        put(self, "trusted_proxies", networks(policy.trusted_proxies))
        put(self, "trusted_peers", networks(policy.trusted_peers))
        put(self, "client_keys", ClientKeys(policy.client_ipv6_prefix))
        put(self, "_head_limits", names_head(policy.rate_limits))
        put(self, "_head_routes", names_head(policy.routes))
        put(self, "plan_mark", object())
        # (in place: a middleware holds the dict of plans by (method, path))
        self._plans.clear()
        self._host_plans.clear()
        self._root_globs_said.clear()
        self._bulkheads_before = {**self._bulkheads_before, **self.bulkheads}
        self.bulkheads.clear()
        for reader in self.live_policy_readers():
            reader.read()

    def read_policy_with(self, read: Callable[[], None]) -> PolicyReader:
        """Have `read` called when a policy is swapped in, while the caller keeps the
        answer: the engine holds it weakly, so many middlewares built on one long-lived
        engine and dropped do not stay alive with it (nor each re-read every swap)."""
        reader = PolicyReader(read)
        readers = self.policy_readers
        # (gone with its reader: a dead reference equals itself alone)
        readers.append(weakref.ref(reader, readers.remove))
        return reader

    def live_policy_readers(self) -> list[PolicyReader]:
        """The readers whose middleware is still alive, in the order they were added."""
        return [reader for ref in list(self.policy_readers) if (reader := ref()) is not None]

    # ------------------------------------------------------------ plans

    def plan_for(self, scope: Mapping[str, Any]) -> RoutePlan:
        """The plan for this request; cached by (method, path), bounded."""
        return self._cached_plan(scope, scope["method"], False)

    def preflight_plan_for(self, scope: Mapping[str, Any]) -> RoutePlan:
        """The plan for a CORS preflight: the route's, without its rate limits. A
        browser sends one on its own before a cross-origin call; charging it would
        bill the client twice per call, and refusing it would reach the page as a
        CORS failure (the 429 unreadable). Its route, breaker and deadline are those of
        the request it asks for (`Access-Control-Request-Method`): a `[[route]]` entry
        with `methods`, or an endpoint's override, names that method, never OPTIONS.
        Cached like `plan_for`, per asked method."""
        return self._cached_plan(scope, "OPTIONS", True, _asked_method(scope))

    def _cached_plan(
        self, scope: Mapping[str, Any], method: str, preflight: bool, asked: str = ""
    ) -> RoutePlan:
        path: str = scope["path"]
        # (as the middleware reads it: a plan is for the path under one root path)
        root: object = scope.get("root_path", "")
        key = (f"{_PREFLIGHT} {asked}" if preflight else method, path)
        plan = self._plans.get(key)
        if plan is not None and plan.root_path == root:
            return plan
        by_host = self._by_host
        if by_host is None:
            by_host = self._by_host = _routes_by_host(scope.get("app") or self.route_app)
        if by_host or plan is not None:
            # The app routes by Host: one path may be two hosts' endpoints (their
            # overrides, their names); or this path came before under another root path
            # (a server or proxy that sets it per request), where it is another route
            # path. These plans are cached by host and root path too, and never where
            # the middleware looks up plans by (method, path) alone.
            host_key = (*key, _host_of(scope) if by_host else "", root)
            plan = self._host_plans.get(host_key)
            if plan is None:
                plan = self._build_plan(scope, method, path, preflight, asked)
                if len(self._host_plans) >= _MAX_PLANS:
                    self._host_plans.clear()
                self._host_plans[host_key] = plan
            return plan
        plan = self._build_plan(scope, method, path, preflight, asked)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _build_plan(
        self,
        scope: Mapping[str, Any],
        method: str,
        path: str,
        preflight: bool = False,
        asked: str = "",
    ) -> RoutePlan:
        """The plan of `path` (the scope's) for `method`. The policy's globs match the
        path the app's routes see: without the `root_path` the app is served under
        (`uvicorn --root-path /svc`, a proxy's prefix, a Starlette `Mount`), whichever
        convention the server follows for `path` (`routes.route_path`)."""
        policy = self.policy
        full_path = path
        path = route_path(scope) or "/"  # (the root path itself: the app's root)
        if path != full_path:
            self._say_root_path_globs(full_path, path, scope.get("root_path"))
        # A preflight is the route's for the method it asks about: looked up as OPTIONS, a
        # route's entry or override naming GET was missed, and the preflight got the
        # policy's defaults (a 30 s deadline for the route's 1.5 s) on the route's name.
        served_as = {**scope, "method": asked} if asked else scope
        route_cfg = self._route_config(asked or method, path)
        entry = route_cfg
        # breaker / deadline declared on the endpoint in code (overrides.py)
        route_cfg = endpoint_overrides(served_as, self.route_app, route_cfg)
        # the framework's route: the route's name unless the policy names it, and its
        # path template (`http.route`) whatever names it
        try:
            served = framework_route(scope, self.route_app)
        except Exception:  # naming must never cost the request its limits
            served = None
        if route_cfg is not None:
            route = route_cfg.name or route_cfg.match
            if (
                route_cfg is not entry
                and isinstance(route_cfg.breaker, BreakerConfig)
                and (entry is None or route_cfg.breaker is not entry.breaker)
            ):
                self.coded_breakers.add(route)
        else:
            route = UNMATCHED if served is None else served.name
        breaker = policy.breaker
        deadline_ms = policy.deadline.default_ms
        cap_ms = policy.deadline.cap_ms
        if route_cfg is not None:
            if isinstance(route_cfg.breaker, BreakerConfig):
                breaker = route_cfg.breaker
            elif route_cfg.breaker is False:
                breaker = None
            if route_cfg.deadline_ms is not None:
                deadline_ms = cap_ms = route_cfg.deadline_ms
        limits = tuple(
            lim
            for lim in policy.rate_limits
            if lim.applies_to(path)
            and covers_method(lim.methods, method, self._head_limits)
            # a preflight counts only against a limit that names OPTIONS itself
            and (not preflight or lim.methods is not None)
        )
        plan = RoutePlan(
            route,
            breaker,
            limits,
            deadline_ms / 1000.0 if deadline_ms is not None else None,
            cap_ms / 1000.0 if cap_ms is not None else None,
            route_cfg.enforce if route_cfg is not None else True,
            template=None if served is None else served.template,
        )
        plan.root_path = scope.get("root_path", "")
        if plan.breaker_key is not None and breaker is not None and breaker.scope != "fleet":
            plan.breaker_key = breaker_home(plan.breaker_key, breaker, self.store)
        if any(plan.served) and slash_redirect(scope, self.route_app):
            # the router's redirect is not the resource: charged only by "always" limits
            # (inbound/watch.py); every 3xx is then looked at, on this path alone
            plan.slash_redirect = True
            plan.served_below = min(plan.served_below, 300)
        elif any(plan.served) and method_not_allowed(scope, self.route_app):
            # the router's 405 (FastAPI's to a HEAD on a GET route) never reached an
            # endpoint: charged only by "always" limits, as the redirect
            plan.not_allowed = True
            plan.served_below = min(plan.served_below, 405)
        concurrency = policy.concurrency
        if route_cfg is not None:
            plan.priority = route_cfg.priority
            own = route_cfg.concurrency
            if isinstance(own, ConcurrencyConfig):
                concurrency = own
            elif own is False:  # this route opts out of [concurrency]
                concurrency = None
        if concurrency is not None:
            plan.concurrency = concurrency
            plan.bulkhead = self.bulkhead_for(route, concurrency)
        return plan

    def bulkhead_for(self, route: str, cfg: ConcurrencyConfig) -> ConcurrencyLimiter:
        """The route's one bulkhead. Plans are built on whichever thread (event loop)
        first sees the route, so two can ask at once: `setdefault` is one atomic dict
        step, and the loser's new limiter is dropped unused, so the route's in-flight
        limit is never split across two objects. Once created it is one lookup."""
        limiter = self.bulkheads.get(route)
        if limiter is None:
            spec = ConcurrencySpec(
                limit=cfg.limit,
                adaptive=cfg.adaptive,
                min_limit=cfg.min_limit,
                max_limit=cfg.max_limit,
                default_share=cfg.default_share,
                sheddable_share=cfg.sheddable_share,
                max_queue=cfg.max_queue,
                tolerance=cfg.tolerance,
                shed_stale=cfg.shed_stale,
                newest_first=cfg.admits_newest,
            )
            old = self._bulkheads_before.pop(route, None)
            # (the policy swapped in left the route's bulkhead as it was: the same one,
            # with the requests it holds; changed, a new one, and those end on the old)
            fresh = old if old is not None and old.spec == spec else ConcurrencyLimiter(spec)
            limiter = self.bulkheads.setdefault(route, fresh)
        return limiter

    def _say_root_path_globs(self, full_path: str, path: str, root: object) -> None:
        """A glob that matches the path with its root path and not without it was
        written for the path the server gives (`/svc/api/*`): it matches the app's
        route paths now (`/api/*`). Said once per glob, when a plan is built."""
        said = self._root_globs_said
        tables: tuple[tuple[str, tuple[RateLimit | RouteConfig, ...]], ...] = (
            ("rate_limit", self.policy.rate_limits),
            ("route", self.policy.routes),
        )
        for kind, entries in tables:
            for i, entry in enumerate(entries):
                for glob in (entry.match, *getattr(entry, "exclude", ())):
                    if (
                        glob not in said
                        and glob_matches(glob, full_path)
                        and not glob_matches(glob, path)
                    ):
                        said.add(glob)
                        logger.warning(
                            "fidelity_mw: %s[%d] glob %r matches %r only with the "
                            "root_path %r the app is served under: globs match the path "
                            "the app's routes see (%r); write the glob without the root "
                            "path",
                            kind,
                            i,
                            glob,
                            full_path,
                            root,
                            path,
                        )

    def _route_config(self, method: str, path: str) -> RouteConfig | None:
        for cfg in self.policy.routes:
            if glob_matches(cfg.match, path) and covers_method(
                cfg.methods, method, self._head_routes
            ):
                return cfg
        return None

    async def aclose(self) -> None:
        await self.store.aclose()


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def _asked_method(scope: Mapping[str, Any]) -> str:
    """The method a CORS preflight asks for, when it is one of the usual ones ("" else:
    a client's odd tokens would each build and cache a plan of their own)."""
    for item in scope.get("headers") or ():
        if (
            isinstance(item, list | tuple)
            and len(item) == 2
            and item[0] == b"access-control-request-method"
        ):
            asked = bytes(item[1]).decode("latin-1").strip().upper()
            return asked if asked in _METHODS and asked != "OPTIONS" else ""
    return ""


def method_not_allowed(scope: Mapping[str, Any], fallback_app: object = None) -> bool:
    """Will the app's router answer `scope` 405 itself? No route serves its method, and
    one serves its path with another method (Starlette's partial match; FastAPI's GET
    route and a HEAD, which Starlette's own routes serve with the GET handler)."""
    method = scope.get("method")
    found = serving_route(scope, fallback_app)
    if found is None or found[1] is not None:
        return False
    for other in _METHODS:
        if other != method:
            served = serving_route({**scope, "method": other}, fallback_app)
            # the route that matched without the method serves another: not an app
            # mounted under it (`Mount("/", app=legacy)`), which serves this request
            if served is not None and served[1] is not None and served[0] == found[0]:
                return True
    return False


def _routes_by_host(app: object, depth: int = 0) -> bool:
    """Does `app` route by Host (a Starlette `Host`, here or in a mounted app)?"""
    try:
        for route in flat_routes(getattr(app, "routes", None) or ()):
            if getattr(route, "path_regex", None) is None:
                if getattr(route, "host_regex", None) is not None:
                    return True
                continue
            is_mount = getattr(route, "endpoint", None) is None and depth < 8
            if is_mount and _routes_by_host(route, depth + 1):
                return True
    except Exception:  # a third-party route object with odd attributes
        return False
    return False


def _host_of(scope: Mapping[str, Any]) -> str:
    # the host as the routes match it: lowercased, an IPv6 literal whole (cut at its
    # first colon, every one was "[" and `[::2]` got the plan of `[::1]`)
    return routes_host(scope)
