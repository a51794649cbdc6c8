"""`Telemetry`: decisions -> spans, span events and metrics, through the OpenTelemetry API only.

Inbound (`start` / `end`, called by FidelityMiddleware):

* a SERVER span that is already recording (the ASGI, FastAPI or Starlette
  instrumentation installed outside the middleware) gets the `fidelity.*`
  attributes and one `fidelity.decision` event per decision - no span of ours.
  That instrumentation ends its span with the last response body message, so
  the annotation happens in `before_response_end`, which the middleware calls
  just before sending it; without that call the decisions go on a child span;
* otherwise the observer starts its own SERVER span ("METHOD template", the
  template being the route's `http.route`), parented on the trace context (and
  baggage) of the request headers, so the library is useful without any other
  instrumentation.

Outbound (`attempt_start` / `attempt_end`, called by FidelityTransport): one
CLIENT span per attempt with the stable HTTP semantic conventions and
`http.request.resend_count`, trace context injected into each attempt's
headers. When opentelemetry-instrumentation-httpx instruments httpx's own
transports, its spans for the inner call are suppressed (ours already
describe the attempt); when it instruments the client (its CLIENT span wraps
the whole transport), we defer to that span and annotate it instead of
nesting CLIENT spans.

Without an SDK (the API's default proxy/no-op providers) every hook returns
after a clock read; a global provider set later is picked up within a second
(at once when `configure_otel()` set it), so it may run after the app is built.
Only public OpenTelemetry API is used.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Final

from opentelemetry import context as otel_context
from opentelemetry import metrics as metrics_api
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.metrics import MeterProvider, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    INVALID_SPAN,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from .._mypyc import mypyc_attr
from ..context import (
    ALLOW,
    ATTEMPT_DECISIONS,
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_LB,
    LAYER_RETRY,
    PROBE,
    RETRY,
    SHED,
    Decision,
    DecisionContext,
)
from ..inbound.admission import admission_decisions, admission_shape
from ..inbound.responses import shed_outcome
from ..state.base import fleet_key
from ..state.snapshot import first_breakers
from . import schema as s
from .metrics import MAX_PENDING, Metrics, metrics_for
from .schema import CLIENT_KEY_HASH as _CLIENT_KEY_HASH
from .schema import DECIDED_BY as _DECIDED_BY
from .schema import DECISION_EVENT as _DECISION_EVENT
from .schema import DECISIONS as _DECISIONS
from .schema import DETAIL_PREFIX as _DETAIL_PREFIX
from .schema import LAYER as _LAYER
from .schema import OUTCOME as _OUTCOME
from .schema import POLICY_VERSION as _POLICY_VERSION
from .schema import REASON as _REASON
from .schema import ROUTE as _ROUTE
from .schema import STALE_DECISIONS as _STALE_DECISIONS
from .schema import STATE_AGE_MS as _STATE_AGE_MS
from .schema import STATE_SOURCE as _STATE_SOURCE
from .schema import STATE_STALE as _STATE_STALE
from .schema import SUBJECT as _SUBJECT
from .schema import VERDICT as _VERDICT
from .summary import _BY_FACTS, Summary, summarize, summary_of

if TYPE_CHECKING:
    import httpx

    from .._types import Scope
    from ..engine import Engine

logger = logging.getLogger("fidelity_mw.telemetry")

INSTRUMENTATION_NAME: Final = "fidelity_mw"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.27.0"

# Spans these instrumentations start are "the server span" even when their kind
# is INTERNAL (they start INTERNAL spans when another span is already current,
# e.g. an in-process call through httpx.ASGITransport).
_SERVER_INSTRUMENTATIONS: Final = frozenset(
    {
        "opentelemetry.instrumentation.asgi",
        "opentelemetry.instrumentation.fastapi",
        "opentelemetry.instrumentation.starlette",
    }
)
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
# Query parameters whose values the HTTP semantic conventions say to redact in url.full.
_SENSITIVE_QUERY_KEYS: Final = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")
_SENSITIVE_QUERY_BYTES: Final = tuple(k.encode() for k in _SENSITIVE_QUERY_KEYS)
_UNMATCHED_ROUTE: Final = "!unmatched"  # routes.UNMATCHED, without importing starlette here
_BREAKER_STATES: Final = ("closed", "open", "half_open")
# The middleware answers these itself, without the app (and without setting ctx.status).
_REJECTION_STATUS: Final = {"rejected": 429, "shed": 503, "expired": 504}
_MAX_CACHED: Final = 4096
_MAX_SUBJECTS: Final = 1024
_ATTRIBUTE_TYPES: Final = frozenset({str, int, float, bool})
# Details that are durations (`retry_after_s`, `delay_ms`): always exported as doubles, so
# a backend that types a field by its first value sees one type.
_DURATION_SUFFIXES: Final = ("_s", "_ms")
# While no global provider is set, the API is asked again at most this often (its
# getters read the environment on every call, ~0.7 us).
_RECHECK_S: Final = 1.0


# ---------------------------------------------------------------- helpers


class _GlobalProviders:
    """The global providers, through the public API only.

    A global provider is set once for the life of the process, so once one is
    found it is kept. Until then the answer "none yet" is trusted for
    `_RECHECK_S`: a provider set later (e.g. `configure_otel()` after the
    app is built) is picked up within a second, or at once after `refresh()`,
    which `configure_otel` calls.
    """

    __slots__ = ("meter", "next_meter", "next_tracer", "tracer")

    def __init__(self) -> None:
        self.tracer: TracerProvider | None = None
        self.meter: MeterProvider | None = None
        self.next_tracer = 0.0
        self.next_meter = 0.0

    def refresh(self) -> None:
        self.next_tracer = self.next_meter = 0.0

    def tracer_provider(self) -> TracerProvider | None:
        provider = self.tracer
        if provider is not None:
            return provider
        now = time.monotonic()
        if now < self.next_tracer:
            return None
        self.next_tracer = now + _RECHECK_S
        provider = trace_api.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider):
            return None
        self.tracer = provider
        return provider

    def meter_provider(self) -> MeterProvider | None:
        provider = self.meter
        if provider is not None:
            return provider
        now = time.monotonic()
        if now < self.next_meter:
            return None
        self.next_meter = now + _RECHECK_S
        provider = metrics_api.get_meter_provider()
        if _is_proxy_meter_provider(provider):
            return None
        self.meter = provider
        return provider


def _is_proxy_meter_provider(provider: object) -> bool:
    """The API's stand-in until a global MeterProvider is set. Its class is not public:
    any provider the API package defines, other than the explicit no-op one, is it."""
    return (
        provider is not None
        and type(provider).__module__.startswith("opentelemetry.metrics")
        and not isinstance(provider, metrics_api.NoOpMeterProvider)
    )


GLOBAL_PROVIDERS: Final = _GlobalProviders()


def _no_global_yet(explicit: object, found: object, next_check: float) -> bool:
    """The no-SDK fast path: no explicit provider, no global one found, and not yet
    time to ask the API again (one clock read, no API call)."""
    return explicit is None and found is None and time.monotonic() < next_check


def global_tracer_provider() -> TracerProvider | None:
    """The globally set tracer provider, or None while only the API's proxy exists."""
    GLOBAL_PROVIDERS.refresh()
    return GLOBAL_PROVIDERS.tracer_provider()


def global_meter_provider() -> MeterProvider | None:
    """The globally set meter provider, or None while only the API's proxy exists."""
    GLOBAL_PROVIDERS.refresh()
    return GLOBAL_PROVIDERS.meter_provider()


class _ScopeGetter(Getter[Any]):
    """Reads propagation headers (traceparent, tracestate, baggage) from an ASGI scope."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier.get("headers") or () if k == name]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k.decode("latin-1") for k, _v in carrier.get("headers") or ()]


_SCOPE_GETTER: Final = _ScopeGetter()
_SERVER: Final = SpanKind.SERVER


def _template(ctx: DecisionContext, scope: Scope) -> str | None:
    """The path template of the request's route (`http.route`): its plan's, cached with
    the plan (looked up again here rather than carried on every request's context)."""
    try:
        return ctx.engine.plan_for(scope).template
    except KeyError:
        # A websocket handshake's scope has no method: its route is the GET's (as the
        # middleware plans it), so its span is named and routed like any other.
        try:
            return ctx.engine.plan_for({**scope, "method": ctx.method}).template
        except Exception:
            return None
    except Exception:  # a hand-built scope without a path: no template
        return None


def _is_server_span(span: Span) -> bool:
    kind = getattr(span, "kind", None)
    if kind is None:  # not the SDK's span class: cannot tell, trust the caller's setup
        return True
    if kind is SpanKind.SERVER:
        return True
    if kind is SpanKind.INTERNAL:
        scope = getattr(span, "instrumentation_scope", None)
        return getattr(scope, "name", None) in _SERVER_INSTRUMENTATIONS
    return False


# Per app middleware stack: the OpenTelemetry ASGI middleware in it, and whether it runs
# outside ours (True) or inside (False); None when the stack has none.
_STACKS: weakref.WeakKeyDictionary[Any, tuple[Any, bool] | None] = weakref.WeakKeyDictionary()


def _find_instrumentation(stack: Any) -> tuple[Any, bool] | None:
    node, ours_seen = stack, False
    for _ in range(64):  # middleware chains are short; a cycle must not hang a request
        cls = type(node)
        module = cls.__module__
        if module.startswith("opentelemetry.instrumentation.") and hasattr(node, "excluded_urls"):
            return node, not ours_seen
        if cls.__name__ == "FidelityMiddleware" and module.startswith("fidelity_mw"):
            ours_seen = True
        node = getattr(node, "app", None)
        if node is None:
            break
    return None


def _instrumentation_declined(scope: Scope) -> bool:
    """Did the app's own ASGI instrumentation choose not to trace this request?

    Called when no span is current. An instrumentation outside the middleware
    that started no span excluded the request (its `excluded_urls`, or
    suppression): a span of ours would become the parent of the app's spans
    in a trace nobody asked for. One inside the middleware has not run yet:
    ask its exclusion list the same question it will ask.
    """
    utils = sys.modules.get("opentelemetry.instrumentation.utils")
    enabled = getattr(utils, "is_http_instrumentation_enabled", None)
    if enabled is not None and not enabled():
        return True
    stack = getattr(scope.get("app"), "middleware_stack", None)
    if stack is None:
        return False
    try:
        found = _STACKS[stack]
    except KeyError:
        found = _find_instrumentation(stack)
        _STACKS[stack] = found
    except TypeError:  # not weak-referenceable: look each time
        found = _find_instrumentation(stack)
    if found is None:
        return False
    middleware, outside = found
    if outside:
        return True
    excluded = middleware.excluded_urls
    if not excluded:
        return False
    asgi = sys.modules.get(type(middleware).__module__)
    url_of = getattr(asgi, "get_host_port_url_tuple", None)
    if url_of is None:
        return False
    return bool(excluded.url_disabled(url_of(scope)[2]))


def _method(method: str) -> tuple[str, str | None]:
    """(http.request.method, http.request.method_original or None) per the conventions."""
    if method in _KNOWN_METHODS:
        return method, None
    upper = method.upper()
    if upper in _KNOWN_METHODS:
        return upper, method
    return "_OTHER", method


def _redacted_url(url: httpx.URL) -> str:
    """url.full without credentials or fragment, sensitive query values replaced."""
    if url.userinfo or url.fragment:
        url = url.copy_with(username=None, password=None, fragment=None)
    query = url.query
    if query and any(key in query for key in _SENSITIVE_QUERY_BYTES):
        parts = []
        for part in query.decode("latin-1").split("&"):
            key, eq, _value = part.partition("=")
            parts.append(f"{key}=REDACTED" if eq and key in _SENSITIVE_QUERY_KEYS else part)
        url = url.copy_with(query="&".join(parts).encode("latin-1"))
    return str(url)


def _subject_of(url: httpx.URL) -> str:
    """The upstream key the transport records decisions under (host, or host:port)."""
    port = url.port
    return url.host if port is None else f"{url.host}:{port}"


def _state_of(decision: Decision) -> str | None:
    """The breaker state a breaker decision reveals, if any."""
    if decision.layer != LAYER_BREAKER:
        return None
    reason = decision.reason
    if reason == "breaker_closed":
        return "closed"
    if reason == "half_open_probe" or decision.verdict == PROBE:
        return "half_open"
    if reason in ("breaker_open", "breaker_half_open"):
        return "open" if reason == "breaker_open" else "half_open"
    return None


def _detach_quietly(token: Any) -> None:
    """otel_context.detach, minus its logged traceback when the request's (or call's)
    coroutine is finalised in another context (a dropped coroutine): nothing of ours is
    set there. Public names only: the token of the SDK's default runtime context is a
    plain `contextvars.Token`, reset through the standard library; any other runtime
    context's token goes to `otel_context.detach`."""
    if type(token) is contextvars.Token:  # the SDK's default runtime context
        try:  # noqa: SIM105 - per request: a try costs nothing, suppress() does
            token.var.reset(token)
        except ValueError:
            pass
    else:
        otel_context.detach(token)


class _Inbound:
    """The token `start` hands to `before_response_end` and `end`.

    Set at creation: what every request reads. `token` and `end_ns` are set by `start`
    for our own span only (read only when `owned`); `dropped` and `summary` by the
    annotation that sets `exported` (read only once it is 0 or more)."""

    __slots__ = ("dropped", "end_ns", "exported", "owned", "span", "summary", "token")

    token: object | None  # the attached OpenTelemetry context (our own span only)
    end_ns: int | None  # our own span's end: the last body message's time (None: at `end`)
    dropped: int  # the context's dropped records when annotated (a long request's)
    summary: Summary  # of the decisions annotated

    def __init__(self, span: Span, owned: bool) -> None:
        self.span = span
        self.owned = owned
        self.exported = -1  # decisions already sent as events; -1: not annotated yet


class _Attempt:
    """The token `attempt_start` hands to `attempt_end`."""

    __slots__ = ("attrs", "owned", "span", "started", "suppress", "token")

    def __init__(
        self,
        span: Span,
        token: object | None,
        owned: bool,
        started: float,
        attrs: dict[str, Any] | None,
        suppress: AbstractContextManager[None] | None = None,
    ) -> None:
        self.span = span
        self.token = token
        self.owned = owned
        self.started = started
        self.attrs = attrs
        self.suppress = suppress  # entered: httpx instrumentation's spans held off


@mypyc_attr(native_class=False)  # the breaker gauge's callback holds it weakly
class BreakerWatch:
    """The breakers a `Telemetry` reports on: the engines it saw (their memory stores are
    read at collection) and the states decisions revealed for stores it cannot read.

    Its own object, held by the observer, so that the gauge's callback can hold it
    weakly: a compiled `Telemetry` cannot be weakly referenced."""

    def __init__(self) -> None:
        self.engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        # breaker states seen in decisions, for stores we cannot read directly:
        # (subject, scope) -> state, scope "route" or "upstream"
        self.seen: dict[tuple[str, str], str] = {}
        # upstream subject -> (the policy asked, whether it gives that upstream a breaker)
        self._breakered: dict[str, tuple[object, bool]] = {}
        # the services (`lb` decisions' subjects): their breakers are their instances'
        self.services: set[str] = set()

    def has_breaker(self, engine: Engine, subject: str) -> bool:
        """Does `engine`'s policy give upstream `subject` (`host` or `host:port`, as the
        transport's decisions name it) a breaker? Asked once per subject and policy."""
        policy = engine.policy
        known = self._breakered.get(subject)
        if known is not None and known[0] is policy:
            return known[1]
        # the host, as the transport asks the policy: `host:port` less its port (an IPv6
        # address, colons of its own, is asked whole first, then less a port)
        host, sep, port = subject.rpartition(":")
        if sep and host and port.isdigit() and ":" not in host:
            cfg = policy.upstream_for(host)
        else:
            cfg = policy.upstream_for(subject)
            if sep and host and port.isdigit() and not cfg.host.strip("*"):
                cfg = policy.upstream_for(host)
        if len(self._breakered) >= _MAX_SUBJECTS:
            self._breakered.clear()
        has = cfg.breaker is not None
        self._breakered[subject] = (policy, has)
        return has

    def _learned_open(self, engine: Engine) -> None:
        """A service's instance breaker on a store read only through decisions (Redis):
        the balancer steers calls away from an instance it knows open, so no decision
        names it while it is; what the transports learned of it does (a call's outcome
        that opened it, a gate that refused it: `Instance.open_until`). It keeps that
        reading until a decision about it says otherwise (a probe, an attempt let
        through), as a host breaker does."""
        seen = self.seen
        try:
            now = engine.clock.monotonic()
            transports = list(engine.transports)
        except Exception:  # an engine without a clock or transports of its own
            return
        mark = getattr(engine, "plan_mark", None)
        for transport in transports:
            upstreams = getattr(transport, "_upstreams", None)
            if not isinstance(upstreams, Mapping):
                continue
            for up in list(upstreams.values()):
                if getattr(up, "mark", None) is not mark:
                    up = getattr(up, "parked", None)  # the plan under the policy before
                    if up is None or getattr(up, "mark", None) is not mark:
                        continue
                if getattr(up, "breaker", None) is None:
                    continue  # (`breaker = false`: its instances' pauses are no breaker's)
                for instance in list(getattr(up, "instances", None) or ()):
                    if instance.open_until > now:
                        key = (instance.key, "upstream")
                        if key in seen or len(seen) < _MAX_SUBJECTS:
                            seen[key] = "open"

    def _drop_unbreakered(self, states: dict[tuple[str, str], str]) -> None:
        """Leave out the breakers no engine's policy has any more (a swap that set
        `breaker = false`): the store keeps such a breaker as it was, open for good when
        it was open, and nothing uses or updates it again. An upstream's is asked of the
        policy the way the admin page ages a breaker (a service's instances take the
        service's); a route's as the page asks it (`route_breakers_in_force`: one its
        endpoint's code declares stays, as it stays in force)."""
        if not states:
            return
        # (the page's imports: not at start-up)
        from ..admin.view import route_breakers_in_force, snapshot_configs

        engines = list(self.engines)
        if not engines:
            return
        lookups = None
        routes = None
        for found in list(states):
            subject, kind = found
            if kind == "upstream":
                if lookups is None:
                    lookups = [snapshot_configs(engine).breaker for engine in engines]
                key = "upstream:" + subject
                if all(breaker(key) is None for breaker in lookups):
                    del states[found]
                    self.seen.pop(found, None)
            elif kind == "route":
                if routes is None:
                    routes = [route_breakers_in_force(engine) for engine in engines]
                if not any(in_force(subject) for in_force in routes):
                    # (its reading kept: the store keeps the breaker, and a swap back
                    # shows it again as a memory store's gauge does, before a request)
                    del states[found]

    def breaker_observations(self) -> list[Observation]:
        """One observation per breaker and state: 1 for its current state, 0 otherwise.

        Memory stores are read directly (their state is authoritative); for
        other stores the state last revealed by a decision is reported.
        """
        states: dict[tuple[str, str], str] = {}
        seen = self.seen
        for engine in list(self.engines):
            store = engine.store
            breakers = getattr(store, "breakers", None)
            if not isinstance(breakers, Mapping):
                self._learned_open(engine)
                continue
            # A shared store's local copy (tiered: the breakers it cached, as last synced)
            # drops a breaker a second after its last request: remembered here, so the
            # gauge keeps its last reading, as for Redis, rather than losing the series
            # of an open breaker on a quiet route between two requests (and the alert
            # that selects it with it).
            shared = hasattr(store, "fallback_why")
            try:
                items = list(breakers.items())
            except RuntimeError:  # resized while copied by another thread
                continue
            if len(items) > _MAX_SUBJECTS:
                # A memory store holds up to its max_breakers (10,000), one per upstream
                # host its calls named: only those that can keep a place in the gauge
                # are looked at (a scrape on the event loop, prometheus_client's ASGI
                # app, walked them all, 90 ms at 100,000). The rank is the one below.
                keys = [item[0] for item in items]
                held = [getattr(item[1], "state", None) for item in items]
                try:
                    chosen = first_breakers(keys, held, _MAX_SUBJECTS, routes_first=True)
                except TypeError:  # another store's keys (not strings)
                    chosen = list(range(len(items)))
                items = [items[i] for i in chosen]
            for key, breaker in items:
                kind, _, subject = str(key).partition(":")
                state = getattr(breaker, "state", None)
                if isinstance(state, str) and subject:
                    if shared:
                        # a process's own breaker (`scope = "process"`) is kept under its
                        # key + "@" + the process's id, random per start: named as the
                        # fleet's breaker would be, as on Redis and memory, so a series and
                        # the alerts that select it outlive a restart (the series is this
                        # process's already, by its resource)
                        subject = fleet_key(subject)
                    found = (subject, "route" if kind == "route" else "upstream")
                    states[found] = state
                    if shared and (found in seen or len(seen) < _MAX_SUBJECTS):
                        seen[found] = state
        known = {subject for subject, _ in states}
        for (subject, kind), state in list(seen.items()):
            if subject not in known:
                states[(subject, kind)] = state
        self._drop_unbreakered(states)
        if len(states) > _MAX_SUBJECTS:
            # A memory store holds up to its max_breakers, one per upstream host its calls
            # named (URLs the service's clients supply, for a webhook sender): bounded as
            # the decisions' breakers are, route breakers and those not closed (what the
            # alerts select) first, the rest in the store's order.
            ranked = sorted(states.items(), key=_gauge_rank)
            states = dict(ranked[:_MAX_SUBJECTS])
        out = []
        for (subject, kind), state in states.items():
            for candidate in _BREAKER_STATES:
                attrs = {s.SUBJECT: subject, s.BREAKER_STATE: candidate}
                if kind:
                    attrs[s.BREAKER_SCOPE] = kind
                out.append(Observation(1 if candidate == state else 0, attrs))
        return out


def _gauge_rank(item: tuple[tuple[str, str], str]) -> tuple[bool, bool]:
    """The order in which breakers keep their place in a bounded gauge: route breakers,
    then those not closed, first."""
    (_subject, kind), state = item
    return kind != "route", state == "closed"


# ---------------------------------------------------------------- the observer


# tests subclass it
@mypyc_attr(allow_interpreted_subclasses=True)
class Telemetry:
    """Exports fidelity_mw's decisions through OpenTelemetry. Implements both
    `RequestObserver` (for FidelityMiddleware) and `AttemptObserver` (for
    FidelityTransport).

    `tracer_provider` / `meter_provider`: explicit wiring; default the global
    providers (picked up within a second of being set, then kept).
    `decision_events`: `"non_allow"` (default) adds a `fidelity.decision` span
    event only for decisions other than `allow` - every decision is in the
    packed `fidelity.decisions` attribute anyway; `"all"` adds one per decision.
    `request_attributes`: `"lean"` (default) leaves out of the span of a request every
    layer allowed and the app served the attributes that would only say so or repeat
    what the process's other spans say (`fidelity.decided_by`, `fidelity.outcome`,
    `fidelity.route`, `fidelity.policy.version`): each costs the SDK's validation on
    every request; `"all"` sets them on every request.
    `client_spans`: one CLIENT span per outbound attempt (default True);
    False leaves outbound spans to opentelemetry-instrumentation-httpx and only
    injects trace context. `client_key_salt`: key for hashing client keys into
    `fidelity.client.key_hash` (default: `FIDELITY_MW_CLIENT_KEY_SALT` from the
    environment, else random per process - hashes then do not match across
    processes, which is the point of a privacy default).

        FidelityMiddleware(app, policy=policy, observer=Telemetry(tracer_provider=tp))
        FidelityTransport(observer=Telemetry(tracer_provider=tp))
    """

    # `before_response_end` does nothing without the token of a span `start` began: the
    # middleware leaves it uncalled then (read with getattr: another observer's hook is
    # called whatever its token)
    _end_hook_needs_token: ClassVar[bool] = True

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        client_spans: bool = True,
        client_key_salt: bytes | str | None = None,
        decision_events: str = "non_allow",
        request_attributes: str = "lean",
    ) -> None:
        if decision_events not in ("non_allow", "all"):
            raise ValueError(f"decision_events={decision_events!r}: 'non_allow' or 'all'")
        if request_attributes not in ("lean", "all"):
            raise ValueError(f"request_attributes={request_attributes!r}: 'lean' or 'all'")
        self.all_events = decision_events == "all"
        self.all_attributes = request_attributes == "all"
        # a plain request's span gets the lean attributes and no event
        self._lean = not (self.all_attributes or self.all_events)
        if isinstance(tracer_provider, ProxyTracerProvider):
            tracer_provider = None  # "the global one, whenever it is set"
        if _is_proxy_meter_provider(meter_provider):
            meter_provider = None
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer: Tracer | None = None
        self._tracing_off = isinstance(tracer_provider, NoOpTracerProvider)
        self._metrics: Metrics | None = None
        self._metrics_off = isinstance(meter_provider, metrics_api.NoOpMeterProvider)
        self._lock = threading.Lock()
        self.client_spans = client_spans
        if client_key_salt is None:
            env_salt = os.environ.get("FIDELITY_MW_CLIENT_KEY_SALT")
            salt = env_salt.encode() if env_salt else os.urandom(16)
        else:
            salt = client_key_salt.encode() if isinstance(client_key_salt, str) else client_key_salt
        self._salt = salt[:64]
        self._key_hashes: dict[str, str] = {}
        self._shared_attrs: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._breakers = BreakerWatch()
        self._last_engine: weakref.ref[Engine] | None = None
        self._last_readable = False
        # the last policy seen and its version (`Policy.version` is a property: an
        # interpreted call per request in the compiled build)
        self._policy_version: tuple[object, str] = (None, "")

    # ------------------------------------------------------------ providers

    def _get_tracer(self) -> Tracer | None:
        if self._tracing_off:
            return None
        provider = self._tracer_provider or GLOBAL_PROVIDERS.tracer_provider()
        if provider is None:
            return None
        if isinstance(provider, NoOpTracerProvider):
            self._tracing_off = True  # the global provider is set once, for good
            return None
        with self._lock:
            if self._tracer is None:
                self._tracer = provider.get_tracer(
                    INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL
                )
        return self._tracer

    def _get_metrics(self) -> Metrics | None:
        if self._metrics_off:
            return None
        provider = self._meter_provider or GLOBAL_PROVIDERS.meter_provider()
        if provider is None:
            return None
        if isinstance(provider, metrics_api.NoOpMeterProvider):
            self._metrics_off = True
            return None
        with self._lock:
            if self._metrics is None:
                meter = provider.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
                # shared with every Telemetry on this meter: the SDK keeps the first
                # instruments of a name, and would drop a second Telemetry's counts
                self._metrics = metrics_for(meter, self._breakers)
        return self._metrics

    # ------------------------------------------------------------ inbound

    def start(self, ctx: DecisionContext, scope: Scope) -> _Inbound | None:
        tracer = self._tracer
        if tracer is None:
            # no SDK: the common fast way out (`_no_global_yet`, inline: interpreted, a
            # frame less on every request of the two-line default)
            if (
                self._tracer_provider is None
                and GLOBAL_PROVIDERS.tracer is None
                and time.monotonic() < GLOBAL_PROVIDERS.next_tracer
            ):
                return None
            tracer = self._get_tracer()
            if tracer is None:
                return None
        engine = ctx.engine
        if engine.attempt_observer is None:
            # FidelityTransport inside this app's requests reports to the same providers.
            engine.attempt_observer = self
        current = trace_api.get_current_span()
        if current.is_recording():
            if getattr(current, "kind", None) is _SERVER or _is_server_span(current):
                # The instrumentation's span: annotate it, start none of our own. Its
                # `http.route` (or its lack of one) is its own, as its span name and its
                # duration metric are: left alone (docs/telemetry.md, `http.route`).
                return _Inbound(current, False)
            parent = otel_context.get_current()  # e.g. a caller's CLIENT span, in-process
        elif current is INVALID_SPAN:
            if _instrumentation_declined(scope):
                return None
            # Into the current context, not an empty one: baggage and values that outer
            # layers attached (suppression flags, framework data) must reach the app.
            parent = propagate.extract(
                scope, context=otel_context.get_current(), getter=_SCOPE_GETTER
            )
        else:
            return None  # a span exists but is not sampled: add nothing
        method, original = _method(ctx.method)
        # `http.route` and the span name take the framework's path template alone (the
        # HTTP conventions), not the route's name (`fidelity.route`): no `[[route]]` name,
        # no host pattern; none when the framework gives none
        route = _template(ctx, scope) if ctx.route != _UNMATCHED_ROUTE else None
        attrs: dict[str, Any] = {s.HTTP_REQUEST_METHOD: method}
        if original is not None:
            attrs[s.HTTP_REQUEST_METHOD_ORIGINAL] = original
        if route is not None:
            attrs[s.HTTP_ROUTE] = route
        path = scope.get("path")
        if path:
            attrs[s.URL_PATH] = path
        scheme = scope.get("scheme")
        if scheme:
            attrs[s.URL_SCHEME] = scheme
        version = scope.get("http_version")
        if version:
            attrs[s.NETWORK_PROTOCOL_VERSION] = version
        name = method if method != "_OTHER" else "HTTP"
        span = tracer.start_span(
            f"{name} {route}" if route is not None else name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attrs,
        )
        inbound = _Inbound(span, True)
        inbound.token = otel_context.attach(trace_api.set_span_in_context(span, parent))
        inbound.end_ns = None
        return inbound

    def before_response_end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None:
        """The middleware is about to send the last body message of the response.

        An ASGI/FastAPI/Starlette instrumentation ends its server span as soon
        as that message is through, before the middleware returns: annotate
        its span now. (Our own span waits for `end`.)
        """
        if token is None:
            return
        if token.owned:
            # The response ends here for the client, as the ASGI instrumentation's span
            # does: our span ends at this time, not after what the app runs once the
            # response is out (a background task), which is no part of its latency.
            # (The clock read the SDK's `end` would make, moved here.)
            token.end_ns = time.time_ns()
            return
        span = token.span
        if not span.is_recording():
            return
        # `summary_of`'s common way, inline (a frame less per request): the records are
        # still the admission's facts, and a request with the same facts was summarised
        pending = ctx._pending
        summary: Summary | None = None
        if pending is not None and pending[0] is admission_decisions and not ctx._decisions:
            facts = admission_shape(ctx, pending[1], pending[2])
            if facts is not None:
                summary = _BY_FACTS.get(facts)
        if summary is None:
            summary = summary_of(ctx)
        status = ctx.status
        if (
            summary.lean
            and self._lean
            and ctx.decided_by is None
            and status is not None
            and status < 400
            and not ctx.upstream_exhausted
            and ctx.inbound_attempt < 2
        ):
            # A plain request the app served (`_annotate`'s way for it, without its
            # shared attributes, outcome and status steps): its decisions and client alone
            span.set_attribute(_DECISIONS, summary.packed)
            client_key = ctx.client_key
            if client_key is not None:
                key_hash = self._key_hashes.get(client_key)
                span.set_attribute(_CLIENT_KEY_HASH, key_hash or self.hash_client_key(client_key))
        else:
            self._annotate(ctx, span, False, summary, 0, provisional=True)
        token.exported = summary.count
        token.dropped = ctx.dropped_total
        token.summary = summary
        # the events at `end` start at this index: a long request's later records are
        # dropped after it, never before (context.py, `_make_room`)
        ctx.seal(summary.count)

    def end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None:
        if (
            token is None
            and self._metrics is None
            and self._meter_provider is None
            and GLOBAL_PROVIDERS.meter is None
            and time.monotonic() < GLOBAL_PROVIDERS.next_meter
        ):
            # No span and no SDK meter yet: nothing to annotate or count (`_count`'s
            # first way out, inline: two frames less per request of the two-line default).
            return
        summary: Summary | None = None
        try:
            if token is not None:
                if token.owned:
                    try:
                        summary = summary_of(ctx)
                        self._annotate(ctx, token.span, True, summary, token.exported)
                    finally:
                        try:
                            # runs the span processors: the SDK lets their exceptions
                            # through, and our context must not stay attached for them
                            token.span.end(token.end_ns)
                        finally:
                            if token.token is not None:
                                _detach_quietly(token.token)
                elif token.span.is_recording():  # not ended with the last body message
                    summary = summary_of(ctx)
                    self._annotate(ctx, token.span, False, summary, token.exported)
                elif token.exported < 0:
                    summary = summary_of(ctx)
                    self._late_span(ctx, token, summary)
                elif ctx._pending is not None or (
                    token.exported == len(ctx._decisions) and token.dropped == ctx.dropped_total
                ):
                    # Annotated, and nothing was decided since: the records were still the
                    # admission's facts when summarised (nothing reads or adds one without
                    # building them first), or are as many as then.
                    summary = token.summary
        finally:
            # counted whatever happened to the span (a raising span processor)
            metrics = self._metrics
            last = self._last_engine
            if (
                summary is not None
                and summary.plain
                and metrics is not None
                and last is not None
                and last() is ctx.engine
                and self._last_readable
            ):
                # `_count`'s common way (`_count_plain`), inline: two frames less per
                # request. A plain shape on a store whose breakers are read directly.
                shape = (summary, ctx.outcome, ctx.decided_by, ctx.route)
                with metrics.lock:
                    pending = metrics.pending  # replaced by a flush: read under the lock
                    n = pending.get(shape)
                    if n is not None:
                        pending[shape] = n + 1
                    else:
                        pending[shape] = 1
                        if len(pending) > MAX_PENDING:
                            metrics.flush_locked()
            else:
                self._count(ctx, summary)

    def _count(self, ctx: DecisionContext, summary: Summary | None) -> None:
        """The request's counters (and the breaker states its decisions revealed)."""
        metrics = self._metrics
        if metrics is None:
            if _no_global_yet(
                self._meter_provider, GLOBAL_PROVIDERS.meter, GLOBAL_PROVIDERS.next_meter
            ):
                return
            metrics = self._get_metrics()
            if metrics is None:
                return
        if summary is None:
            summary = summary_of(ctx)
        last = self._last_engine
        if last is not None and last() is ctx.engine:
            readable = self._last_readable
        else:
            readable = self._observe_engine(ctx)
        if summary.plain and readable:
            # A plain shape reads no decision: one pending count for the whole request
            # (`Metrics.record`'s first branch, inlined: in the compiled build that call ran
            # 48 of the 51 bytecodes of ours still interpreted on a traced request).
            _count_plain(metrics, (summary, ctx.outcome, ctx.decided_by, ctx.route))
            return
        decisions = ctx.decisions
        metrics.record(ctx, decisions, summary)
        if not readable:
            self._note_breakers(decisions, ctx.route, ctx.engine, ctx._breakers_after)

    def _late_span(self, ctx: DecisionContext, token: _Inbound, summary: Summary) -> None:
        """The instrumentation's span ended before we could annotate it (a middleware that
        does not call `before_response_end`): record the decisions on a child span rather
        than lose them, started when its parent started (the SDK's spans say when)."""
        tracer = self._tracer
        if tracer is None:
            return
        parent = trace_api.set_span_in_context(token.span)
        start_time = getattr(token.span, "start_time", None)
        method = _method(ctx.method)[0]  # a client's own method names no span
        span = tracer.start_span(
            f"fidelity {method if method != '_OTHER' else 'HTTP'} {ctx.route}",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=start_time if isinstance(start_time, int) else None,
        )
        try:
            self._annotate(ctx, span, False, summary, 0)
        finally:
            span.end()

    def _annotate(
        self,
        ctx: DecisionContext,
        span: Span,
        owned: bool,
        summary: Summary,
        exported: int,
        provisional: bool = False,
    ) -> None:
        """Everything on the span in one `set_attributes`; span events for the decisions
        after the first `exported` that are not `allow` (all, with `decision_events="all"`)."""
        decided_by = ctx.decided_by
        outcome = ctx.outcome
        status = ctx.status
        if status is None and outcome is not None:
            status = _REJECTION_STATUS.get(outcome)
        if provisional and decided_by is None and status is not None:
            # Sent by the app; the middleware settles the outcome after the app returns,
            # as this says (OutcomeRecorder.after_app): an error answer a layer inside the
            # app caused (an outbound breaker, `Depends(limit)`'s 429) is that layer's.
            shed_by = ctx.shed_by
            if shed_by is not None and status >= 400:
                decided_by = shed_by
                outcome = shed_outcome(ctx, shed_by)
            else:
                decided_by = "app"
                outcome = "served" if status < 500 else "failed"
        # The attributes every request of this shape, route and outcome shares, built once.
        policy = ctx.engine.policy
        seen = self._policy_version
        if seen[0] is policy:
            version = seen[1]
        else:
            version = policy.version
            self._policy_version = (policy, version)
        key = (summary, ctx.route, decided_by, outcome, version)
        shared = self._shared_attrs.get(key)
        if shared is None:
            shared = self._shared_attributes(key)
        attrs = shared.copy()  # the SDK copies the values; a custom span might keep the dict
        client_key = ctx.client_key
        if client_key is not None:
            key_hash = self._key_hashes.get(client_key)
            attrs[_CLIENT_KEY_HASH] = key_hash or self.hash_client_key(client_key)
        if ctx.upstream_exhausted:
            attrs[s.UPSTREAM_EXHAUSTED] = True
        if ctx.inbound_attempt > 1:
            attrs[s.INBOUND_ATTEMPT] = ctx.inbound_attempt
        if owned:
            if status is not None:
                attrs[s.HTTP_RESPONSE_STATUS_CODE] = status
                if status >= 500:
                    attrs[s.ERROR_TYPE] = str(status)
                    span.set_status(Status(StatusCode.ERROR))
            elif outcome == "failed":
                exc = sys.exception()
                error_type = type(exc).__qualname__ if exc is not None else "_OTHER"
                attrs[s.ERROR_TYPE] = error_type
                span.set_status(Status(StatusCode.ERROR, error_type))
                if exc is not None:
                    # the `exception` event (type, message, stack trace) the ASGI
                    # instrumentation's span has: the trace says where the app broke
                    span.record_exception(exc)
        if len(attrs) > 2:
            span.set_attributes(attrs)
        else:
            # a plain request's one or two: `set_attributes` validates the mapping itself
            # first (three ABC checks, a copy), more than one `set_attribute` costs
            for name, value in attrs.items():
                span.set_attribute(name, value)
        if summary.flagged or self.all_events:
            decisions = ctx.decisions
            self._add_events(span, ctx, decisions[exported:] if exported > 0 else decisions)

    def _shared_attributes(self, key: tuple[Any, ...]) -> dict[str, Any]:
        summary, route, decided_by, outcome, version = key
        attrs: dict[str, Any]
        if outcome == "served" and decided_by == "app" and summary.lean and not self.all_attributes:
            # A plain request (every layer allowed, the app served it, nothing stale):
            # its decisions alone. The SDK validates each attribute on every request (~80
            # bytecodes), and the others would say `app`/`served` or repeat the process's
            # route identity and policy version, which its counters and refusals carry.
            attrs = {_DECISIONS: summary.packed}
        else:
            attrs = {
                _POLICY_VERSION: version,
                _ROUTE: route,
                _DECISIONS: summary.packed,
            }
            if summary.stale:  # absent means 0, as OpenTelemetry does with resend_count
                attrs[_STALE_DECISIONS] = summary.stale
            if summary.dropped:  # a long request's records, counted instead of kept
                attrs[s.DECISIONS_DROPPED] = summary.dropped
                attrs[s.DECISIONS_DROPPED_COUNTS] = summary.dropped_packed
            if decided_by is not None:
                attrs[_DECIDED_BY] = decided_by
            if outcome is not None:
                attrs[_OUTCOME] = outcome
        if not summary.aged:  # an aged summary is one request's own
            if len(self._shared_attrs) >= _MAX_CACHED:
                self._shared_attrs.clear()
            self._shared_attrs[key] = attrs
        return attrs

    def _add_events(self, span: Span, ctx: DecisionContext, decisions: Sequence[Decision]) -> None:
        """One `fidelity.decision` event per decision that is not `allow` (per decision
        with `decision_events="all"`): the packed summary already lists them all."""
        if not self.all_events:
            decisions = [d for d in decisions if d.verdict != ALLOW]
        if not decisions:
            return
        # Decision.at is on the engine's monotonic clock; events want epoch nanoseconds.
        now_ns = time.time_ns()
        offset_ns = now_ns - int(ctx.engine.clock.monotonic() * 1e9)
        for d in decisions:
            layer, subject, verdict, reason, source, age_s, at, details = d
            attrs: dict[str, Any] = {
                _LAYER: layer,
                _VERDICT: verdict,
                _REASON: reason,
                _SUBJECT: subject,
                _STATE_SOURCE: source,
                _STATE_AGE_MS: round(age_s * 1000.0, 3) if age_s else 0.0,
            }
            if d.is_stale:
                attrs[_STATE_STALE] = True
            if details:
                for key, value in details.items():
                    kind = type(value)
                    if kind is int:
                        if key.endswith(_DURATION_SUFFIXES):
                            value = float(value)  # a duration is a double, whoever passed it
                    elif kind not in _ATTRIBUTE_TYPES:
                        value = str(value)
                    attrs[_DETAIL_PREFIX + key] = value
            timestamp = offset_ns + int(at * 1e9) if at else now_ns
            span.add_event(_DECISION_EVENT, attrs, timestamp)

    # ------------------------------------------------------------ outbound

    def attempt_start(
        self, ctx: DecisionContext, request: httpx.Request, attempt: int
    ) -> _Attempt | None:
        tracer = self._tracer
        if tracer is None:
            # No SDK set up (the common case): `_get_tracer` and `_no_global_yet`, inlined,
            # on one clock read (three calls and two reads a call when they were calls).
            found = GLOBAL_PROVIDERS
            now = time.monotonic()
            if not self._tracing_off and (
                self._tracer_provider is not None
                or found.tracer is not None
                or now >= found.next_tracer
            ):
                tracer = self._get_tracer()
            if tracer is None:
                # No tracing here, but a propagated trace passes through untouched.
                if trace_api.get_current_span().get_span_context().is_valid:
                    propagate.inject(request.headers)
                if (
                    self._metrics is None
                    and self._meter_provider is None
                    and found.meter is None
                    and now < found.next_meter
                ):
                    return None  # no SDK at all: the common fast way out
                return self._timed_attempt(request)
        current = trace_api.get_current_span()
        outer_client = current.is_recording() and getattr(current, "kind", None) is SpanKind.CLIENT
        if outer_client or not self.client_spans:
            # An outer CLIENT span (opentelemetry-instrumentation-httpx's instrument_client
            # wraps the whole transport) describes this call: annotate it, do not nest.
            propagate.inject(request.headers)
            if not outer_client:
                return None
            if attempt > 1:
                current.set_attribute(s.HTTP_REQUEST_RESEND_COUNT, attempt - 1)
            self._add_events(current, ctx, _attempt_decisions(ctx, request))
            return _Attempt(current, None, False, 0.0, None)
        url = request.url
        method, original = _method(request.method)
        attrs: dict[str, Any] = {
            s.HTTP_REQUEST_METHOD: method,
            s.URL_FULL: _redacted_url(url),
            s.SERVER_ADDRESS: url.host,
            s.SERVER_PORT: url.port or (443 if url.scheme == "https" else 80),
        }
        if original is not None:
            attrs[s.HTTP_REQUEST_METHOD_ORIGINAL] = original
        if attempt > 1:
            attrs[s.HTTP_REQUEST_RESEND_COUNT] = attempt - 1
        decisions = _attempt_decisions(ctx, request)
        if decisions:
            attrs[s.DECISIONS] = summarize(decisions).packed
        span = tracer.start_span(
            method if method != "_OTHER" else "HTTP", kind=SpanKind.CLIENT, attributes=attrs
        )
        span_ctx = trace_api.set_span_in_context(span)
        propagate.inject(request.headers, context=span_ctx)
        token = otel_context.attach(span_ctx)
        suppress = _suppress_httpx_spans()
        self._add_events(span, ctx, decisions)
        self._observe_engine(ctx)
        return _Attempt(span, token, True, time.perf_counter(), attrs, suppress)

    def _timed_attempt(self, request: httpx.Request) -> _Attempt | None:
        """Metrics without tracing (a Prometheus-only setup): no span, but the attempt is
        timed for `http.client.request.duration` all the same (and, as under our CLIENT
        span, the httpx instrumentation's own metric for it is held off)."""
        if self._get_metrics() is None:
            return None
        url = request.url
        attrs: dict[str, Any] = {
            s.HTTP_REQUEST_METHOD: _method(request.method)[0],
            s.SERVER_ADDRESS: url.host,
            s.SERVER_PORT: url.port or (443 if url.scheme == "https" else 80),
        }
        suppress = _suppress_httpx_spans()
        return _Attempt(INVALID_SPAN, None, True, time.perf_counter(), attrs, suppress)

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        if token is None:
            return
        span: Span = token.span
        status = response.status_code if response is not None else None
        error_type: str | None = None
        # A hedge race's loser, cancelled by the call, is a request that did not complete:
        # OTel's HTTP conventions count a cancelled request as failed (error.type the
        # exception's type, the same on the span and the duration metric). Without it the
        # loser's duration sat among the successful attempts'.
        cancelled = isinstance(error, asyncio.CancelledError)
        if error is not None:
            error_type = type(error).__qualname__
        elif status is not None and status >= 400:
            error_type = str(status)
        if not token.owned:
            if span.is_recording():
                event: dict[str, Any] = {}
                if status is not None:
                    event[s.HTTP_RESPONSE_STATUS_CODE] = status
                if error_type is not None:
                    event[s.ERROR_TYPE] = error_type
                span.add_event(s.ATTEMPT_EVENT, event)
            return
        try:
            if token.suppress is not None:
                token.suppress.__exit__(None, None, None)
            if token.token is not None:
                _detach_quietly(token.token)  # a dropped call may end in another context
        finally:
            attrs: dict[str, Any] = {}
            if status is not None:
                attrs[s.HTTP_RESPONSE_STATUS_CODE] = status
                version = response.http_version if response is not None else ""
                if version.startswith("HTTP/"):
                    attrs[s.NETWORK_PROTOCOL_VERSION] = version[5:]
            if error_type is not None:
                attrs[s.ERROR_TYPE] = error_type
                span.set_status(Status(StatusCode.ERROR, error_type if error else None))
            if cancelled:
                attrs[s.ATTEMPT_CANCELLED] = True
            try:
                if attrs:
                    span.set_attributes(attrs)
                span.end()  # runs the span processors, whose exceptions the SDK lets through
            finally:
                self._record_duration(token, status, error_type)

    def _record_duration(self, token: _Attempt, status: int | None, error_type: str | None) -> None:
        metrics = self._metrics or self._get_metrics()
        if metrics is not None and token.attrs is not None:
            base = token.attrs
            mattrs: dict[str, Any] = {
                s.HTTP_REQUEST_METHOD: base[s.HTTP_REQUEST_METHOD],
                s.SERVER_ADDRESS: base[s.SERVER_ADDRESS],
                s.SERVER_PORT: base[s.SERVER_PORT],
            }
            if status is not None:
                mattrs[s.HTTP_RESPONSE_STATUS_CODE] = status
            if error_type is not None:
                mattrs[s.ERROR_TYPE] = error_type
            metrics.client_duration.record(time.perf_counter() - token.started, mattrs)

    def call_end(self, ctx: DecisionContext) -> None:
        """An outbound call made outside any request finished (its context is the
        transport's own): count its decisions, which no `end` will see."""
        metrics = self._metrics or self._get_metrics()
        if metrics is None:
            return
        readable = self._observe_engine(ctx)
        summary = summary_of(ctx)
        decisions = ctx.decisions
        metrics.record(None, decisions, summary)
        if not readable:
            self._note_breakers(decisions, None, ctx.engine, ctx._breakers_after)

    # ------------------------------------------------------------ privacy

    def hash_client_key(self, key: str) -> str:
        """The keyed BLAKE2b hash (16 hex chars) exported instead of a client key."""
        cached = self._key_hashes.get(key)
        if cached is None:
            cached = hashlib.blake2b(
                key.encode("utf-8", "surrogateescape"), key=self._salt, digest_size=8
            ).hexdigest()
            if len(self._key_hashes) >= _MAX_CACHED:
                self._key_hashes.clear()
            self._key_hashes[key] = cached
        return cached

    # ------------------------------------------------------------ breaker gauge

    def _observe_engine(self, ctx: DecisionContext) -> bool:
        """Watch this engine's breakers; True when its store's breakers can be read
        directly (memory), so decisions need not be scanned for breaker states."""
        engine = ctx.engine
        last = self._last_engine
        if last is None or last() is not engine:
            self._breakers.engines.add(engine)
            self._last_engine = weakref.ref(engine)
            self._last_readable = isinstance(getattr(engine.store, "breakers", None), Mapping)
        return self._last_readable

    def _note_breakers(
        self,
        decisions: Sequence[Decision],
        route: str | None,
        engine: Engine,
        after: list[tuple[Decision | None, str, str, str]] | None = None,
    ) -> None:
        """Remember the breaker states decisions reveal (for stores we cannot read).

        `route`: the request's route (its route breaker's decisions have it as their
        subject), None for an outbound call outside any request. An outbound attempt
        records no breaker decision when the host breaker let it through closed (only
        a probe or a refusal does), so an attempt sent to an upstream whose breaker
        was last seen open or half-open, without a probe of its own, reveals that it
        closed: without this the gauge stayed on `open` after the upstream recovered,
        and the breaker-open alert with it. Its first attempt lists its breaker (when
        the policy gives it one) as closed: a memory store's gauge lists every breaker
        it holds, not only those once seen open.

        `after`: what the store answered to outcomes that moved a breaker (a probe's
        success closed it, a failure opened it: `DecisionContext.note_breaker`), each
        taken in its place, after the record it followed: no decision says it, and the
        gauge showed the probe's `half_open` (or the attempt's `closed`) until the
        breaker's next decision."""
        watch = self._breakers
        seen = watch.seen
        probed = ""
        notes: dict[int, list[tuple[str, str, str]]] | None = None
        if after:
            notes = {}
            for anchor, subject, kind, moved in after:
                if anchor is None:
                    self._note_state(subject, kind, moved)
                else:
                    notes.setdefault(id(anchor), []).append((subject, kind, moved))
        # A service's decisions name the service; its breakers are its instances'. The
        # `lb` decision before an attempt says which instance the breaker and retry
        # decisions after it are about (and whether it went there around a breaker known
        # open: panic, ejection bound, which proves nothing of it).
        picked: dict[str, tuple[str, bool]] | None = None
        previous: Decision | None = None
        for d in decisions:
            if notes and previous is not None:
                noted = notes.pop(id(previous), None)
                if noted is not None:
                    for subject, kind, moved in noted:
                        self._note_state(subject, kind, moved)
            previous = d
            layer = d.layer
            if layer == LAYER_LB:
                details = d.details or {}
                instance = details.get("instance")
                if isinstance(instance, str):
                    if picked is None:
                        picked = {}
                        if d.subject not in watch.services and len(watch.services) < _MAX_SUBJECTS:
                            watch.services.add(d.subject)
                    picked[d.subject] = (instance, details.get("breaker_known_open") is True)
                continue
            subject = d.subject
            around_open = False
            if picked is not None:
                target = picked.get(subject)
                if target is not None:
                    subject, around_open = target
            if layer == LAYER_RETRY:
                key = (subject, "upstream")
                if d.verdict in (ALLOW, RETRY) and subject != probed and not around_open:
                    last = seen.get(key)
                    if last is None:
                        if len(seen) < _MAX_SUBJECTS and watch.has_breaker(engine, d.subject):
                            seen[key] = "closed"
                    elif last != "closed":
                        seen[key] = "closed"
                probed = ""
                if picked is not None:
                    picked.pop(d.subject, None)  # the attempt's: the next one picks again
                continue
            if layer != LAYER_BREAKER:
                continue
            state = _state_of(d)
            if state is None and d.verdict in (GIVE_UP, SHED, "reject"):
                state = "open" if d.reason == "breaker_open" or d.verdict == SHED else None
            # a probe's attempt decision follows it: that attempt proves nothing yet
            probed = subject if d.verdict == PROBE else ""
            if state is None:
                continue
            if subject == d.subject and subject in watch.services:
                # a service's refusal with no instance picked (every one known open): its
                # instances' breakers are in the gauge (`BreakerWatch.learned`), and the
                # service itself has none
                continue
            key = (subject, "route" if d.subject == route else "upstream")
            if key in seen or len(seen) < _MAX_SUBJECTS:
                seen[key] = state
        if notes and previous is not None:
            # (a note whose record a long request dropped is left out: in its place or
            # not at all, never after a later decision that may say otherwise)
            for subject, kind, moved in notes.pop(id(previous), ()):
                self._note_state(subject, kind, moved)

    def _note_state(self, subject: str, kind: str, state: str) -> None:
        seen = self._breakers.seen
        key = (subject, kind)
        if key in seen or len(seen) < _MAX_SUBJECTS:
            seen[key] = state

    def breaker_observations(self) -> list[Observation]:
        """One observation per breaker and state: 1 for its current state, 0 otherwise
        (see `BreakerWatch.breaker_observations`)."""
        return self._breakers.breaker_observations()


def _count_plain(metrics: Metrics, shape: tuple[Summary, str | None, str | None, str]) -> None:
    """One request of a plain shape (`Metrics.record`'s first branch): one pending count,
    the pending kinds bounded (checked when a kind is new, the only time they grow)."""
    with metrics.lock:
        pending = metrics.pending  # replaced by a flush: read under the lock
        n = pending.get(shape)
        if n is not None:
            pending[shape] = n + 1
            return
        pending[shape] = 1
        if len(pending) > MAX_PENDING:
            metrics.flush_locked()


def _suppress_httpx_spans() -> AbstractContextManager[None] | None:
    """While our attempt span is current, hold off opentelemetry-instrumentation-httpx's
    span for httpx's own inner transport (it would double ours), through the
    instrumentation package's public switch. Entered here, exited by `attempt_end`."""
    if not _httpx_instrumented():
        return None
    utils = sys.modules.get("opentelemetry.instrumentation.utils")
    switch = getattr(utils, "suppress_http_instrumentation", None)
    if switch is None:
        return None
    manager: AbstractContextManager[None] = switch()
    manager.__enter__()
    return manager


def _attempt_decisions(ctx: DecisionContext, request: httpx.Request) -> list[Decision]:
    """The decisions that led to this attempt: the run for this upstream since the previous
    attempt (a service's pick, a breaker probe, then the retry layer's attempt/retry
    decision). It ends at the attempt's own decision when the loop names it
    (`ATTEMPT_DECISIONS`: a retry's run, recorded before its backoff, is not the record's
    last when another call of the request went on meanwhile); else at the record's end (a
    first attempt, whose run and start no other call's decisions come between)."""
    decisions = ctx.decisions
    marked = request.extensions.get(ATTEMPT_DECISIONS)
    if marked:
        own = _own_run(decisions, marked)
        # Its own decisions alone when the bounded record dropped the run: the record's
        # trailing run for the upstream was another call's when a call to the same
        # upstream went on while this one backed off (its `attempt` on this retry's span)
        return own if own is not None else list(marked)
    subject = _subject_of(request.url)
    if decisions and decisions[-1].subject != subject:
        subject = _service_of(decisions, subject)
    out: list[Decision] = []
    seen_attempt = False
    for d in reversed(decisions):
        if d.subject != subject or len(out) >= 8:
            break
        if d.layer == LAYER_RETRY:
            if seen_attempt:
                break  # the previous attempt's
            seen_attempt = True
        out.append(d)
    out.reverse()
    return out


def _own_run(decisions: Sequence[Decision], marked: Sequence[Decision]) -> list[Decision] | None:
    """The run that ends at the attempt's retry-layer decision `marked[0]` (found by
    identity, from the record's end: a retry's is near it unless other calls recorded
    many meanwhile), then the rest of `marked`: back to the previous retry-layer
    decision, or to the run's pick (a service's `lb` decision: each attempt's first),
    never another upstream's. None when the record no longer holds it (a long
    request's, bounded)."""
    last = marked[0]
    at = len(decisions) - 1
    while at >= 0 and decisions[at] is not last:
        at -= 1
    if at < 0:
        return None
    subject = last.subject
    out: list[Decision] = []
    at -= 1
    while at >= 0 and len(out) < 7:
        d = decisions[at]
        if d.subject != subject or d.layer == LAYER_RETRY:
            break
        out.append(d)
        if d.layer == LAYER_LB:
            break
        at -= 1
    out.reverse()
    out.extend(marked)
    return out


def _service_of(decisions: Sequence[Decision], instance: str) -> str:
    """The subject a service's decisions name when an attempt's URL names one of its
    instances (`host[:port]`): the service's logical host, from the `lb` decision that
    picked that instance just before (its `instance` detail); else `instance` itself."""
    for d in reversed(decisions[-8:]):
        if d.layer == LAYER_LB:
            details = d.details
            if details is not None and details.get("instance") == instance:
                return d.subject
    return instance


def _httpx_instrumented() -> bool:
    """Has opentelemetry-instrumentation-httpx patched httpx's own transports?"""
    module = sys.modules.get("opentelemetry.instrumentation.httpx")
    if module is None:
        return False
    instrumentor = getattr(module, "HTTPXClientInstrumentor", None)
    if instrumentor is None:
        return False
    try:
        return bool(instrumentor().is_instrumented_by_opentelemetry)
    except Exception:
        return False


_VERSION: str | None = None


def _version() -> str:
    global _VERSION
    if _VERSION is None:
        from .. import __version__

        _VERSION = __version__
    return _VERSION
