"""Metrics: decisions, requests and failures tallied in the process and read by
observable counters at collection; the state-age histogram; the breaker gauge.

A synchronous SDK counter costs microseconds per `add` (attribute hashing,
exemplar sampling); a dictionary increment under a lock a tenth of one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from ..context import GIVE_UP, LAYER_BUDGET, LAYER_RETRY, RETRY, Decision, DecisionContext
from . import schema as s
from .summary import LOCAL_SOURCES, Summary

STATE_AGE_BUCKETS: Final = (
    0.0,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_CONTROL_OUTCOMES: Final = frozenset({"rejected", "shed", "expired"})
# The retry layer's verdicts that drew on the retry budget: a retry, and a hedge (it asks
# the budget like a retry: docs/outbound.md, "Hedged requests"; outbound.hedge.HEDGE)
_DRAWN: Final = frozenset({RETRY, "hedge"})
_MAX_CACHED: Final = 4096
_MAX_SERIES: Final = 2048
# request shapes pending before they are folded into the tallies (observer.Telemetry._count
# counts the plain ones itself)
MAX_PENDING: Final = 1024
# Distinct (server.address, server.port) in http.client.request.duration; later hosts
# are recorded as `_OTHER` (no port). A service that calls URLs its clients supply
# (webhooks) would otherwise grow a histogram series set per host without end: the SDK
# sets no limit of its own.
MAX_CLIENT_HOSTS: Final = 256
_OTHER: Final = "_OTHER"
_OTHER_SUBJECT: Final = "_other"  # the folded value of a tally's attribute


class BreakerSource(Protocol):
    """The observer the breaker gauge asks at collection (held weakly)."""

    def breaker_observations(self) -> list[Observation]: ...


class Tally:
    """Counts kept in the process and reported by an observable counter at collection.

    A synchronous SDK counter costs several microseconds per `add` (attribute
    hashing, exemplar sampling); a dict increment under a lock costs ~0.1 us.
    The exported series are the same cumulative sums.
    """

    __slots__ = ("counts", "flush", "lock", "names")

    def __init__(self, names: tuple[str, ...], lock: threading.Lock) -> None:
        self.names = names
        self.counts: dict[tuple[str, ...], int] = {}
        self.lock = lock  # one per meter: a request's counts are taken under one lock
        # called under the lock before the counts are read (Metrics folds its pending
        # request shapes into the tallies)
        self.flush: Callable[[], None] | None = None

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self.lock:
            if self.flush is not None:
                self.flush()
            items = list(self.counts.items())
        names = self.names
        return [Observation(n, dict(zip(names, key, strict=True))) for key, n in items]


def _counter(
    meter: Meter,
    name: str,
    labels: tuple[str, ...],
    unit: str,
    description: str,
    lock: threading.Lock,
) -> Tally:
    """An in-process tally, exported as an observable counter."""
    tally = Tally(labels, lock)
    meter.create_observable_counter(
        name, callbacks=[tally.observe], unit=unit, description=description
    )
    return tally


class Metrics:
    """The instruments of one meter."""

    def __init__(self, meter: Meter, owner: BreakerSource) -> None:
        self.lock = lock = threading.Lock()
        self.decisions = _counter(
            meter,
            s.METRIC_DECISIONS,
            (s.LAYER, s.VERDICT, s.STATE_SOURCE),
            "{decision}",
            "Decisions taken by fidelity_mw's control layers.",
            lock,
        )
        self.requests = _counter(
            meter,
            s.METRIC_REQUESTS,
            (s.OUTCOME, s.DECIDED_BY, s.ROUTE),
            "{request}",
            "Inbound requests by outcome and deciding layer.",
            lock,
        )
        self.failures = _counter(
            meter,
            s.METRIC_FAILURES,
            (s.FAILURE_CAUSE, s.DECIDED_BY, s.ROUTE),
            "{request}",
            "Failed inbound requests: cause=control (a fidelity layer turned the "
            "request away) counted apart from cause=app (the application failed).",
            lock,
        )
        self.budget = _counter(
            meter,
            s.METRIC_RETRY_BUDGET,
            (s.SUBJECT, s.BUDGET_RESULT),
            "{retry}",
            "Retries drawn from the per-upstream retry budget, and retries the "
            "exhausted budget refused.",
            lock,
        )
        self.state_age = _histogram(
            meter,
            s.METRIC_STATE_AGE,
            "s",
            "Age of the shared state a decision was taken on (redis, cache, fallback).",
            STATE_AGE_BUCKETS,
        )
        self.client_duration = HostBoundHistogram(
            _histogram(
                meter,
                s.METRIC_CLIENT_DURATION,
                "s",
                "Duration of HTTP client request attempts made through FidelityTransport.",
                DURATION_BUCKETS,
            )
        )
        owner_ref = weakref.ref(owner)

        def observe_breakers(_options: CallbackOptions) -> Iterable[Observation]:
            watch = owner_ref()  # a BreakerWatch, held weakly
            return watch.breaker_observations() if watch is not None else ()

        meter.create_observable_gauge(
            s.METRIC_BREAKER_STATE,
            callbacks=[observe_breakers],
            unit="1",
            description="Circuit breaker state: 1 for the current state of each breaker, "
            "0 for the others.",
        )

        def observe_policies(_options: CallbackOptions) -> Iterable[Observation]:
            return policy_observations(owner_ref())

        def observe_fallback(_options: CallbackOptions) -> Iterable[Observation]:
            return fallback_observations(owner_ref())

        meter.create_observable_gauge(
            s.METRIC_POLICY_INFO,
            callbacks=[observe_policies],
            unit="1",
            description="1 for the version (content hash) of each policy in force in "
            "the process; a restart with another policy (a rolling deploy) replaces the series.",
        )
        meter.create_observable_gauge(
            s.METRIC_STATE_FALLBACK,
            callbacks=[observe_fallback],
            unit="1",
            description="1 while a shared store (Redis, tiered) decides without its shared "
            "state, by why (unreachable, read_only: a replica refused the writes); 0 otherwise.",
        )
        # the watches of the Telemetry objects sharing these instruments (metrics_for)
        self.owners: SharedOwners | None = None
        self._age_attrs: dict[tuple[str, str], dict[str, str]] = {}
        # Requests not yet folded into the tallies, counted by (summary, outcome,
        # decided_by, route): one increment per request; the decisions, requests and
        # failures tallies get them when read (or when there are too many kinds).
        self.pending: dict[tuple[Summary, str | None, str | None, str], int] = {}
        for tally in (self.decisions, self.requests, self.failures):
            tally.flush = self.flush_locked

    def record(
        self, ctx: DecisionContext | None, decisions: Sequence[Decision], summary: Summary
    ) -> None:
        """One finished request (ctx) or outbound call (ctx None) and its decisions."""
        if ctx is not None and summary.plain:
            # A shape that needs no subject or age: one count for the whole request.
            shape = (summary, ctx.outcome, ctx.decided_by, ctx.route)
            with self.lock:
                pending = self.pending  # replaced by a flush: read under the lock
                pending[shape] = pending.get(shape, 0) + 1
                if len(pending) > MAX_PENDING:
                    self.flush_locked()
            return
        with self.lock:
            counts = self.decisions.counts
            for key in summary.counter_keys:
                counts[key] = counts.get(key, 0) + 1
            for layer, _, verdict, _, source, n in summary.dropped_entries:
                key = (layer, verdict, source)
                counts[key] = counts.get(key, 0) + n
            if ctx is not None:
                outcome = ctx.outcome or "unknown"
                decided_by = ctx.decided_by or "none"
                _bump_locked(self.requests.counts, (outcome, decided_by, ctx.route))
                if outcome in _CONTROL_OUTCOMES:
                    _bump_locked(self.failures.counts, (s.CAUSE_CONTROL, decided_by, ctx.route))
                elif outcome == "failed":
                    _bump_locked(self.failures.counts, (s.CAUSE_APP, decided_by, ctx.route))
        if not summary.plain:
            self._record_subjects(decisions)
            for layer, subject, verdict, _, _, n in summary.dropped_entries:
                # a long request's records counted, not kept (context.py, MAX_DECISIONS)
                if layer == LAYER_RETRY and verdict in _DRAWN:
                    _bump_subject(self.budget, subject, "drawn", n)
                elif layer == LAYER_BUDGET and verdict in (GIVE_UP, "reject"):
                    _bump_subject(self.budget, subject, "exhausted", n)

    def flush_locked(self) -> None:
        """Fold the pending request counts into the tallies (the lock is held)."""
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        decisions = self.decisions.counts
        requests = self.requests.counts
        failures = self.failures.counts
        for (summary, outcome, decided_by, route), n in pending.items():
            for key in summary.counter_keys:
                decisions[key] = decisions.get(key, 0) + n
            outcome = outcome or "unknown"
            decided_by = decided_by or "none"
            _bump_locked(requests, (outcome, decided_by, route), n)
            if outcome in _CONTROL_OUTCOMES:
                _bump_locked(failures, (s.CAUSE_CONTROL, decided_by, route), n)
            elif outcome == "failed":
                _bump_locked(failures, (s.CAUSE_APP, decided_by, route), n)

    def _record_subjects(self, decisions: Sequence[Decision]) -> None:
        """The instruments that read a decision's subject or age: retry budget, state age."""
        for d in decisions:
            layer = d.layer
            if layer == LAYER_RETRY:
                if d.verdict in _DRAWN:
                    _bump_subject(self.budget, d.subject, "drawn")
            elif layer == LAYER_BUDGET and d.verdict in (GIVE_UP, "reject"):
                _bump_subject(self.budget, d.subject, "exhausted")
            age_s = d.state_age_s
            if d.state_source in LOCAL_SOURCES and not age_s > 0.0:
                continue
            age_key = (layer, d.state_source)
            attrs = self._age_attrs.get(age_key)
            if attrs is None:
                attrs = {s.LAYER: layer, s.STATE_SOURCE: d.state_source}
                if len(self._age_attrs) < _MAX_CACHED:
                    self._age_attrs[age_key] = attrs
            self.state_age.record(age_s if age_s > 0.0 else 0.0, attrs)


class SharedOwners:
    """The breaker watches of every `Telemetry` that reports through one meter.

    The SDK registers an instrument name once per meter: a second observable counter of
    that name comes back as the first, its callbacks dropped. Two `Telemetry` on one
    meter provider (the middleware's and a transport's, each given `meter_provider=`)
    therefore share one `Metrics`, whose gauges ask every watch (held weakly: a
    `Telemetry` that is gone stops being asked)."""

    def __init__(self) -> None:
        self.watches: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def engines(self) -> list[Any]:
        found: dict[int, Any] = {}
        for watch in list(self.watches):
            for engine in _engines(watch):
                found[id(engine)] = engine
        return list(found.values())

    def breaker_observations(self) -> list[Observation]:
        watches = list(self.watches)
        if len(watches) == 1:
            return watches[0].breaker_observations()  # type: ignore[no-any-return]
        # two watches that saw one engine report its breakers alike: one series each
        merged: dict[tuple[tuple[str, Any], ...], Observation] = {}
        for watch in watches:
            for observation in watch.breaker_observations():
                merged[tuple(sorted((observation.attributes or {}).items()))] = observation
        return list(merged.values())


# one `Metrics` per meter (see SharedOwners)
_BY_METER: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()
_BY_METER_LOCK: Final = threading.Lock()


def metrics_for(meter: Meter, watch: BreakerSource) -> Metrics:
    """The `Metrics` of `meter`, made once, reporting `watch`'s breakers too."""
    with _BY_METER_LOCK:
        try:
            metrics = _BY_METER.get(meter)
        except TypeError:  # a meter that cannot be weakly referenced: its own, as before
            return Metrics(meter, watch)
        if metrics is None:
            owners = SharedOwners()
            metrics = Metrics(meter, owners)
            metrics.owners = owners  # held here: the callbacks hold it weakly
            _BY_METER[meter] = metrics
        if metrics.owners is not None:
            metrics.owners.watches.add(watch)
        return metrics


def _engines(watch: object) -> list[Any]:
    """The engines a BreakerWatch saw (held weakly by it); none for another owner."""
    engines = getattr(watch, "engines", None)
    if engines is None:
        return []
    try:
        return list(engines)
    except RuntimeError:  # changed while copied by another thread
        return []


def policy_observations(watch: object) -> list[Observation]:
    """`fidelity.policy.info`: 1 per policy version in force, read at collection, so a
    process started with another policy shows it at its first one."""
    versions = set()
    for engine in _engines(watch):
        version = getattr(getattr(engine, "policy", None), "version", None)
        if isinstance(version, str):
            versions.add(version)
    return [Observation(1, {s.POLICY_VERSION: v}) for v in sorted(versions)]


def fallback_observations(watch: object) -> list[Observation]:
    """`fidelity.state.fallback`: for the shared stores (those with `fallback_why`), 1 for
    the reason they decide without their state now, 0 for the other; nothing at all
    while only memory stores are in use."""
    shared = False
    now: set[str] = set()
    for engine in _engines(watch):
        store = getattr(engine, "store", None)
        if not hasattr(store, "fallback_why"):
            continue
        shared = True
        why = getattr(store, "fallback_why", None)
        if isinstance(why, str):
            now.add(why)
    if not shared:
        return []
    return [Observation(1 if why in now else 0, {s.FALLBACK_WHY: why}) for why in s.FALLBACK_WHYS]


def _bump_subject(tally: Tally, subject: str, result: str, n: int = 1) -> None:
    """Count one (subject, result) of the retry budget tally. Past the series bound the
    *subject* (an upstream host, which a service calling its clients' URLs has without
    end) folds into `_other`, never the result: the alert selects on the result."""
    with tally.lock:
        counts = tally.counts
        key = (subject, result)
        if key not in counts and len(counts) >= _MAX_SERIES:
            key = (_OTHER_SUBJECT, result)
        counts[key] = counts.get(key, 0) + n


def _bump_locked(counts: dict[tuple[str, ...], int], key: tuple[str, ...], n: int = 1) -> None:
    if key not in counts and len(counts) >= _MAX_SERIES:
        key = (*key[:-1], "_other")  # bound the cardinality: fold the last attribute
    counts[key] = counts.get(key, 0) + n


class HostBoundHistogram:
    """A histogram whose `server.address` / `server.port` take at most
    `MAX_CLIENT_HOSTS` distinct values; the hosts after that are recorded as
    `server.address = "_OTHER"` without a port (spans keep the real host)."""

    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram
        self.hosts: set[tuple[Any, Any]] = set()

    def record(self, amount: float, attributes: dict[str, Any]) -> None:
        host = (attributes.get(s.SERVER_ADDRESS), attributes.get(s.SERVER_PORT))
        hosts = self.hosts
        if host not in hosts:
            if len(hosts) >= MAX_CLIENT_HOSTS:
                attributes = {k: v for k, v in attributes.items() if k != s.SERVER_PORT}
                attributes[s.SERVER_ADDRESS] = _OTHER
            else:
                hosts.add(host)
        self.histogram.record(amount, attributes)


def _histogram(
    meter: Meter, name: str, unit: str, description: str, buckets: Sequence[float]
) -> Any:
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # opentelemetry-api older than the bucket advisory
        return meter.create_histogram(name, unit=unit, description=description)
