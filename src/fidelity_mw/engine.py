"""The engine: one per middleware (or transport). Policy + clock + randomness + state.

It precomputes per-route plans so the per-request path is dictionary lookups
and arithmetic.
"""

from __future__ import annotations

import hashlib
import random
import weakref
from collections.abc import Mapping
from typing import Any

from ._types import Clock, RandomSource
from .clock import SYSTEM_CLOCK
from .decide.concurrency import ConcurrencyLimiter, ConcurrencySpec
from .decide.gcra import policy_field
from .headers import networks
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
from .routes import UNMATCHED, framework_template
from .state.base import LimitSpec, StateStore
from .state.factory import store_from_policy

_MAX_PLANS = 10_000
_MAX_KEY_CHARS = 64


def sf_string_content(text: str) -> str:
    """`text` made safe inside an RFC 8941 sf-string: printable ASCII only, `"` and `\\`
    escaped, anything else replaced by `?`. Policy validation refuses such names;
    this keeps a name that slipped past it (a policy built around validation) from
    breaking the route's plan, and with it every limit and the breaker."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


def compact_key(key: str) -> str:
    """Client keys longer than 64 chars are hashed: a huge header must not cost huge memory."""
    if len(key) <= _MAX_KEY_CHARS:
        return key
    return "#" + hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


class RoutePlan:
    """Everything about a route that does not depend on the individual request."""

    __slots__ = (
        "admits",
        "breaker",
        "breaker_key",
        "bulkhead",
        "concurrency",
        "deadline_cap_s",
        "deadline_default_s",
        "enforce",
        "ip_key_prefix",
        "key_prefixes",
        "limits",
        "one_advertised",
        "policy_field",
        "policy_header",
        "priority",
        "remaining_prefixes",
        "route",
        "served",
        "served_below",
        "specs",
        "specs_without_credit",
        "timed",
    )

    def __init__(
        self,
        route: str,
        breaker: BreakerConfig | None,
        limits: tuple[RateLimit, ...],
        deadline_default_s: float | None,
        deadline_cap_s: float | None,
        enforce: bool = True,
    ) -> None:
        self.route = route
        # the deadline is enforced while the app runs (504 and cancel, before a response)
        self.enforce = enforce
        self.breaker = breaker
        self.breaker_key = f"route:{route}" if breaker is not None else None
        # the request's end time matters (slow calls count against the breaker)
        self.timed = breaker is not None and breaker.slow_call_ms is not None
        # A complete response with a status below this is a plain success: served, and
        # nothing for the breaker to weigh but one more success (0: always ask the
        # outcome recorder, as for slow-call routes, whose end time must be weighed).
        self.served_below = (
            0 if self.timed else min((500, *breaker.failure_statuses)) if breaker else 500
        )
        self.limits = limits
        self.specs = tuple(
            LimitSpec(
                lim.name,
                lim.emission_interval_s,
                lim.burst_size * lim.emission_interval_s,
                lim.cost,
                lim.shadow,
                # retry credit comes from refunds of requests the service failed
                lim.retry_credit_s if lim.charge == "served" else 0.0,
            )
            for lim in limits
        )
        # Per limit: its units come back when a fault the client did not cause answered 5xx.
        self.served = tuple(lim.charge == "served" for lim in limits)
        # The specs for a refund that earns no retry credit (another limit's 429).
        self.specs_without_credit = tuple(spec._replace(credit_s=0.0) for spec in self.specs)
        # There is something to ask the store (a breaker or a limit).
        self.admits = self.breaker_key is not None or bool(limits)
        # Precomputed pieces of per-request strings (storage keys, RateLimit items).
        self.key_prefixes = tuple(lim.name + "|" for lim in limits)
        # Set when the route has exactly one limit, keyed by client IP.
        self.ip_key_prefix: str | None = (
            self.key_prefixes[0] if len(limits) == 1 and limits[0].key == "client_ip" else None
        )
        # RateLimit item prefixes; None for shadow limits, which are not advertised.
        self.remaining_prefixes: tuple[bytes | None, ...] = tuple(
            None if lim.shadow else f'"{sf_string_content(lim.name)}";r='.encode("ascii")
            for lim in limits
        )
        # The common shape, precomputed for the RateLimit field: exactly one limit, and
        # advertised: (its item prefix, tolerance, emission interval).
        self.one_advertised: tuple[bytes, float, float] | None = None
        if len(limits) == 1 and not limits[0].shadow:
            prefix = self.remaining_prefixes[0]
            assert prefix is not None
            self.one_advertised = (prefix, self.specs[0].tolerance_s, self.specs[0].interval_s)
        self.deadline_default_s = deadline_default_s
        self.deadline_cap_s = deadline_cap_s
        # The route's bulkhead (in-process, shared by every plan of the route) and
        # the priority its requests have unless a trusted header says otherwise.
        self.concurrency: ConcurrencyConfig | None = None
        self.bulkhead: ConcurrencyLimiter | None = None
        self.priority = "default"
        advertised = [lim for lim in limits if not lim.shadow]
        self.policy_header: bytes | None = (
            ", ".join(
                # q units per w seconds: the bucket size, and the time the rate takes
                # to refill it: q/w never exceeds the sustained rate, whatever the burst.
                policy_field(
                    sf_string_content(lim.name),
                    lim.burst_size,
                    lim.burst_size * lim.emission_interval_s,
                )
                for lim in advertised
            ).encode("ascii")
            if advertised
            else None
        )
        # The RateLimit-Policy field as the response carries it: built once, not per response.
        self.policy_field: tuple[bytes, bytes] = (b"ratelimit-policy", self.policy_header or b"")


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
        self.policy = policy if policy is not None else Policy()
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.rng: RandomSource = rng or random.Random().random
        self.store: StateStore = store or store_from_policy(self.policy, self.rng, self.clock)
        self.trusted_proxies = networks(self.policy.trusted_proxies)
        self.trusted_peers = networks(self.policy.trusted_peers)
        self._plans: dict[tuple[str, str], RoutePlan] = {}
        # The app the middleware wraps: its routes name route identities when
        # `scope["app"]` is missing (the middleware wrapped the app directly).
        self.route_app: object | None = None
        # Set by the middleware / transports from `telemetry.py` (or by the user).
        self.request_observer: RequestObserver | None = None
        self.attempt_observer: AttemptObserver | None = None
        # One concurrency limiter per route with a bulkhead: process memory, its
        # only writer the middleware (plans come and go; the limiter stays).
        self.bulkheads: dict[str, ConcurrencyLimiter] = {}
        # The transports built on this engine (weakly: a closed client's goes away), so
        # the admin page can show their balancers' per-instance state (admin/view.py).
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()

    # ------------------------------------------------------------ plans

    def plan_for(self, scope: Mapping[str, Any]) -> RoutePlan:
        """The plan for this request; cached by (method, path), bounded."""
        method: str = scope["method"]
        path: str = scope["path"]
        plan = self._plans.get((method, path))
        if plan is None:
            plan = self._build_plan(scope, method, path)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[(method, path)] = plan
        return plan

    def _build_plan(self, scope: Mapping[str, Any], method: str, path: str) -> RoutePlan:
        policy = self.policy
        route_cfg = self._route_config(method, path)
        # breaker / deadline declared on the endpoint in code (overrides.py)
        route_cfg = endpoint_overrides(scope, self.route_app, route_cfg)
        if route_cfg is not None:
            route = route_cfg.name or route_cfg.match
        else:
            try:
                route = framework_template(scope, self.route_app) or UNMATCHED
            except Exception:  # naming must never cost the request its limits
                route = UNMATCHED
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
            if glob_matches(lim.match, path) and (lim.methods is None or method in lim.methods)
        )
        plan = RoutePlan(
            route,
            breaker,
            limits,
            deadline_ms / 1000.0 if deadline_ms is not None else None,
            cap_ms / 1000.0 if cap_ms is not None else None,
            route_cfg.enforce if route_cfg is not None else True,
        )
        concurrency = policy.concurrency
        if route_cfg is not None:
            plan.priority = route_cfg.priority
            if route_cfg.concurrency is not None:
                concurrency = route_cfg.concurrency
        if concurrency is not None:
            plan.concurrency = concurrency
            plan.bulkhead = self.bulkhead_for(route, concurrency)
        return plan

    def bulkhead_for(self, route: str, cfg: ConcurrencyConfig) -> ConcurrencyLimiter:
        limiter = self.bulkheads.get(route)
        if limiter is None:
            limiter = self.bulkheads[route] = ConcurrencyLimiter(
                ConcurrencySpec(
                    limit=cfg.limit,
                    adaptive=cfg.adaptive,
                    min_limit=cfg.min_limit,
                    max_limit=cfg.max_limit,
                    default_share=cfg.default_share,
                    sheddable_share=cfg.sheddable_share,
                    max_queue=cfg.max_queue,
                    tolerance=cfg.tolerance,
                    shed_stale=cfg.shed_stale,
                )
            )
        return limiter

    def _route_config(self, method: str, path: str) -> RouteConfig | None:
        for cfg in self.policy.routes:
            if glob_matches(cfg.match, path) and (cfg.methods is None or method in cfg.methods):
                return cfg
        return None

    async def aclose(self) -> None:
        await self.store.aclose()
