"""A route's plan: everything about a route that does not depend on the request.

Built once per (method, path) by the engine and read on every request by the inbound
path: its own module so that the compiled build (docs/compiled.md) makes it a native
class, whose attributes compiled code reads as struct fields rather than by name.
"""

from __future__ import annotations

from .decide.concurrency import ConcurrencyLimiter
from .decide.gcra import policy_field
from .decide.specs import LimitSpec
from .policy import BreakerConfig, ConcurrencyConfig, CostFunc, RateLimit


def sf_string_content(text: str) -> str:
    """`text` made safe inside an RFC 8941 sf-string: printable ASCII only, `"` and `\\`
    escaped, anything else replaced by `?`. Policy validation refuses such names;
    this keeps a name that slipped past it (a policy built around validation) from
    breaking the route's plan, and with it every limit and the breaker."""
    # The common case, a name that needs nothing (every validated one): returned as it
    # is, after two C calls and two substring tests rather than a Python loop over its
    # characters (a FastAPI limit's default name, the route template and the rate, is
    # made safe per request). Printable ASCII is exactly " " to "~".
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


class RoutePlan:
    """Everything about a route that does not depend on the individual request."""

    __slots__ = (
        "admits",
        "breaker",
        "breaker_key",
        "bulkhead",
        "concurrency",
        "cost_fns",
        "costed",
        "deadline_cap_s",
        "deadline_default_s",
        "enforce",
        "ip_key_prefix",
        "ip_keys",
        "key_prefixes",
        "limits",
        "not_allowed",
        "one_advertised",
        "policy_field",
        "policy_header",
        "priority",
        "remaining_prefixes",
        "root_path",
        "route",
        "served",
        "served_below",
        "slash_redirect",
        "specs",
        "specs_without_credit",
        "template",
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
        costs: tuple[int, ...] | None = None,
        template: str | None = None,
    ) -> None:
        # The route identity: its breaker, its bulkhead, `fidelity.route`, the default
        # counters. A `[[route]]` name or glob, else the framework route's name, which
        # under a `Host` leads with the host pattern (`api.example.com/items/{id}`).
        self.route = route
        # The `root_path` of the requests it was built for (set by the engine): the
        # middleware's cache by (method, path) serves it to those alone (engine.py).
        self.root_path: object = ""
        # The framework's path template alone, for `http.route` (OpenTelemetry's HTTP
        # conventions: low cardinality, the framework's format, no host): the same under
        # every host and whatever `[[route]]` names the route; None when the framework
        # gives none (the span then has no `http.route`).
        self.template = template
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
        # The app's router answers this path with its trailing-slash redirect (set by
        # the engine): a 307/308 then gives `charge = "served"` limits their units back.
        self.slash_redirect = False
        # The router answers this method 405 (another method's route serves the path; set
        # by the engine): a 405 then gives `charge = "served"` limits their units back.
        self.not_allowed = False
        self.limits = limits
        self.specs = tuple(
            LimitSpec(
                lim.name,
                lim.emission_interval_s,
                lim.burst_size * lim.emission_interval_s,
                lim.fixed_cost if costs is None else costs[i],
                lim.shadow,
                # retry credit comes from refunds of requests the service failed
                lim.retry_credit_s if lim.charge == "served" else 0.0,
            )
            for i, lim in enumerate(limits)
        )
        # A limit whose cost is a function of the request (None: a constant cost), or None
        # when every limit's is constant. Such a plan admits nothing itself: each request
        # is admitted by a plan of its own costs (`costed`; inbound/costs.py).
        fns = tuple(lim.cost_fn for lim in limits)
        self.cost_fns: tuple[CostFunc | None, ...] | None = (
            fns if costs is None and any(fn is not None for fn in fns) else None
        )
        # the plans of this route's requests by their costs (a few repeat)
        self.costed: dict[tuple[int, ...], RoutePlan] = {}
        # Per limit: its units come back when a fault the client did not cause answered 5xx.
        self.served = tuple(lim.charge == "served" for lim in limits)
        # The specs for a refund that earns no retry credit (another limit's 429).
        self.specs_without_credit = tuple(spec._replace(credit_s=0.0) for spec in self.specs)
        # There is something to ask the store (a breaker or a limit) at the middleware's
        # common step: a plan whose costs vary per request asks in a step of its own.
        self.admits = (self.breaker_key is not None or bool(limits)) and self.cost_fns is None
        # Precomputed pieces of per-request strings (storage keys, RateLimit items).
        self.key_prefixes = tuple(lim.name + "|" for lim in limits)
        # Set when the route has exactly one limit, keyed by client IP at the policy's
        # IPv6 prefix (a limit with its own asks `RequestReader.limit_keys`).
        self.ip_key_prefix: str | None = (
            self.key_prefixes[0]
            if len(limits) == 1
            and limits[0].key == "client_ip"
            and limits[0].client_ipv6_prefix is None
            else None
        )
        # ... and its keys by client key, made once per client: shared by every plan of
        # the limit (`ip_keys_of`)
        # (an empty table of its own without: never written to)
        self.ip_keys: dict[str, tuple[str, ...]] = (
            {} if self.ip_key_prefix is None else ip_key_table(self.ip_key_prefix)
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


# Per `ip_key_prefix` (a limit's name): client key -> that client's limit keys, one
# `(prefix + client key,)` per client. A client's requests come with one address string
# (uvicorn builds it once per connection), so the cached key's hash is computed once: a
# key concatenated per request was hashed anew by both of the store's dict operations
# (about 1 k machine instructions a request compiled, with the string and the tuple).
# (`tuple[str, ...]`, not `tuple[str]`: compiled, a fixed-length tuple is unboxed, and
# each read of it built a new tuple object)
_IP_KEYS: dict[str, dict[str, tuple[str, ...]]] = {}
# Clients kept per limit: past this the table starts again (with more clients than this
# active at once, each request of a client no longer held costs one insert more than
# building its key did; about 200 bytes a client, under 1 MB a limit).
_MAX_IP_KEYS: int = 4096


def ip_key_table(prefix: str) -> dict[str, tuple[str, ...]]:
    """The table of limit keys of the limit whose keys start with `prefix` (shared)."""
    table = _IP_KEYS.get(prefix)
    if table is None:
        table = _IP_KEYS[prefix] = {}
    return table


def ip_keys_of(plan: RoutePlan, client_key: str) -> tuple[str, ...]:
    """`(plan.ip_key_prefix + client_key,)`, kept for the client's next requests (a plan
    with an `ip_key_prefix` has its table)."""
    prefix = plan.ip_key_prefix
    if prefix is None:  # (not a plan of one limit by client IP: nothing to keep)
        raise ValueError(f"route {plan.route!r} has no limit keyed by client IP alone")
    keys: tuple[str, ...] = (prefix + client_key,)  # (boxed once: see _IP_KEYS)
    table = plan.ip_keys
    if len(table) >= _MAX_IP_KEYS:
        table.clear()
    table[client_key] = keys
    return keys


_MAX_COSTED: int = 256
# ... and over every route: plans are cached per (method, path), up to 10 000 (a route
# with a path parameter has one per path), each with its costs' plans (about 1 KB each)
_MAX_COSTED_ALL: int = 4096
# the plans that cached one, once per plan cached (their count bounds the plans held)
_COSTED_BY: list[RoutePlan] = []


def costed_plan(plan: RoutePlan, costs: tuple[int, ...]) -> RoutePlan:
    """The plan of one request of `plan`'s route whose limits cost `costs` (one per limit,
    each between 1 and its burst; a limit the request does not ask is left out: 0, or a
    shadow limit's cost above its burst, is given as 0). Cached per route (costs repeat),
    a bounded number in all."""
    found = plan.costed.get(costs)
    if found is not None:
        return found
    kept = [i for i, cost in enumerate(costs) if cost > 0]
    sub = RoutePlan(
        plan.route,
        plan.breaker,
        tuple(plan.limits[i] for i in kept),
        plan.deadline_default_s,
        plan.deadline_cap_s,
        plan.enforce,
        tuple(costs[i] for i in kept),
        template=plan.template,
    )
    sub.breaker_key = plan.breaker_key  # (the process's own, `breaker.scope`)
    sub.slash_redirect = plan.slash_redirect
    sub.root_path = plan.root_path
    sub.not_allowed = plan.not_allowed
    sub.served_below = plan.served_below
    sub.concurrency = plan.concurrency
    sub.bulkhead = plan.bulkhead
    sub.priority = plan.priority
    if len(plan.costed) >= _MAX_COSTED:
        plan.costed.clear()
    if len(_COSTED_BY) >= _MAX_COSTED_ALL:
        for holder in _COSTED_BY:
            holder.costed.clear()
        _COSTED_BY.clear()
    _COSTED_BY.append(plan)
    plan.costed[costs] = sub
    return sub
