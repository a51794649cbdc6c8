"""FidelityTransport: the one retry layer for httpx calls, async and sync.

    client = httpx.AsyncClient(transport=FidelityTransport())
    client = httpx.Client(transport=FidelitySyncTransport())

Per call, outermost first (DESIGN.md, "Outbound"):

1. **deadline**: each attempt gets min(attempt_timeout_ms, remaining deadline)
   as its httpx timeouts and sends it downstream in `x-request-timeout-ms`;
   no attempt starts, and no backoff sleep runs, past the deadline.
2. **breaker (host)**: asked before every attempt; open -> `CircuitOpen`.
3. **retry**: idempotent requests with a replayable body, on the statuses and
   errors the upstream's `RetryConfig` names, with jittered backoff,
   `Retry-After`, capped attempts and a per-host retry budget.

Inside a request handled by `FidelityMiddleware` the transport uses that
request's `DecisionContext` (deadline, decisions) and the middleware's engine
(policy, state, clock). Outside one it uses its own engine and makes a
context per call, whose deadline is the policy's `deadline.default_ms`
(the context is then in `response.extensions["fidelity_context"]`).

Ownership across services: every attempt carries `x-fidelity-attempt: N`;
a >= 500 response carrying `x-fidelity-retry: exhausted` from a trusted peer
is never retried, and every give-up after which retrying us would multiply
load sets `ctx.upstream_exhausted`, so the middleware marks our own error
response. docs/outbound.md has the rules.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx

from .._types import Clock, RandomSource
from ..context import (
    _CURRENT,
    ALLOW,
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_BUDGET,
    LAYER_DEADLINE,
    LAYER_RETRY,
    PROBE,
    REJECT,
    RETRY,
    SOURCE_FALLBACK,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.breaker import FAILURE, IGNORED, OPEN, SUCCESS, Gate
from ..decide.retry import (
    ERROR_CONNECT,
    ERROR_LOCAL,
    ERROR_NETWORK,
    ERROR_OTHER,
    ERROR_TIMEOUT,
    EXHAUSTING_REASONS,
    GIVE_UP_ATTEMPTS,
    GIVE_UP_BREAKER,
    GIVE_UP_BUDGET,
    GIVE_UP_DEADLINE,
    GIVE_UP_DOWNSTREAM,
    IDEMPOTENT_METHODS,
    RetryPlan,
    parse_retry_after,
    plan_retry,
    retryable_error,
)
from ..engine import Engine
from ..errors import CircuitOpen, DeadlineExceeded, FidelityError
from ..headers import Network, in_networks
from ..hooks import AttemptObserver
from ..policy import MAX_ATTEMPTS, BreakerConfig, Policy, RetryConfig
from ..state.base import StateStore
from ..state.memory import MemoryStore

logger = logging.getLogger("fidelity_mw")

ATTEMPT_HEADER: Final = b"x-fidelity-attempt"
TIMEOUT_HEADER: Final = b"x-request-timeout-ms"
RETRY_SIGNAL_HEADER: Final = "x-fidelity-retry"
EXHAUSTED: Final = "exhausted"
CONTEXT_EXTENSION: Final = "fidelity_context"

_IDEMPOTENCY_KEY: Final = b"idempotency-key"
_ATTEMPT_VALUES: Final = tuple(str(i).encode() for i in range(MAX_ATTEMPTS + 2))
_FIRST_ATTEMPT: Final[Mapping[str, DetailValue]] = {"attempt": 1}
_MAX_UPSTREAMS: Final = 1024
_LOCALHOST: Final = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_NO_TIMEOUT: Final[Mapping[str, float | None]] = {
    "connect": None,
    "read": None,
    "write": None,
    "pool": None,
}
_new_tuple = tuple.__new__  # Decision(...) without the keyword-default wrapper: hot path only


# ---------------------------------------------------------------- helpers


def _has_fast_headers() -> bool:
    """httpx keeps headers as a list of (raw key, lower key, value); use it when it is there."""
    probe = httpx.Headers({"a": "b"})
    raw = getattr(probe, "_list", None)
    return isinstance(raw, list) and raw == [(b"a", b"a", b"b")]


_FAST_HEADERS: Final = _has_fast_headers()


_OURS: Final = (ATTEMPT_HEADER, TIMEOUT_HEADER)


def _take_ours(headers: httpx.Headers) -> list[tuple[bytes, bytes, bytes]] | None:
    """Set aside headers named like ours that the caller set (rare): None if there are none."""
    if not _FAST_HEADERS:
        return None
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    for item in raw:
        if item[1] in _OURS:
            prior = [it for it in raw if it[1] in _OURS]
            raw[:] = [it for it in raw if it[1] not in _OURS]
            return prior
    return None


def _stamp(headers: httpx.Headers, attempt: int, timeout_ms: bytes) -> None:
    """Set `x-fidelity-attempt` and `x-request-timeout-ms` for one attempt.

    They are per-attempt metadata: `_unstamp` takes them off the request again
    when the call ends, so the request the caller gets back is the one it built
    (and httpx's own per-header work after the call does not grow). The
    caller's own headers of those names were set aside by `_take_ours`.
    """
    value = _ATTEMPT_VALUES[attempt]
    if not _FAST_HEADERS:
        headers[ATTEMPT_HEADER.decode()] = value.decode()
        headers[TIMEOUT_HEADER.decode()] = timeout_ms.decode()
        return
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    if attempt > 1:
        # Identity, not equality: only our stamps carry these very bytes objects.
        if len(raw) >= 2 and raw[-2][1] is ATTEMPT_HEADER and raw[-1][1] is TIMEOUT_HEADER:
            raw[-2] = (ATTEMPT_HEADER, ATTEMPT_HEADER, value)
            raw[-1] = (TIMEOUT_HEADER, TIMEOUT_HEADER, timeout_ms)
            return
        raw[:] = [it for it in raw if it[1] is not ATTEMPT_HEADER and it[1] is not TIMEOUT_HEADER]
    raw.append((ATTEMPT_HEADER, ATTEMPT_HEADER, value))
    raw.append((TIMEOUT_HEADER, TIMEOUT_HEADER, timeout_ms))


def _unstamp(headers: httpx.Headers, prior: list[tuple[bytes, bytes, bytes]] | None) -> None:
    """Take our per-attempt headers off the request; give back the caller's own."""
    if not _FAST_HEADERS:
        return
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    if len(raw) >= 2 and raw[-2][1] is ATTEMPT_HEADER and raw[-1][1] is TIMEOUT_HEADER:
        del raw[-2:]
    else:
        raw[:] = [it for it in raw if it[1] is not ATTEMPT_HEADER and it[1] is not TIMEOUT_HEADER]
    if prior:
        raw.extend(prior)


def _has_header(headers: httpx.Headers, key: bytes) -> bool:
    if not _FAST_HEADERS:
        return key.decode("latin-1") in headers
    return any(item[1] == key for item in headers._list)


def bounded_timeouts(
    original: Mapping[str, float | None] | None, bound: float
) -> Mapping[str, float | None]:
    """Every httpx timeout (connect, read, write, pool) capped at `bound` seconds.

    Returns `original` itself when nothing needs capping (the common case).
    """
    if original is None:
        original = _NO_TIMEOUT
    for value in original.values():
        if value is None or value > bound:
            return {k: bound if v is None or v > bound else v for k, v in original.items()}
    return original


def error_kind(exc: BaseException) -> str:
    """Map an exception from the inner transport to a `fidelity_mw.decide.retry` error kind."""
    if isinstance(exc, FidelityError):  # a nested fidelity layer already decided
        return ERROR_LOCAL
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ERROR_CONNECT
    if isinstance(exc, httpx.PoolTimeout):  # our own pool is full: not the upstream's fault
        return ERROR_LOCAL
    if isinstance(exc, httpx.TimeoutException):
        return ERROR_TIMEOUT
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return ERROR_NETWORK
    if isinstance(exc, httpx.TransportError):
        return ERROR_LOCAL
    return ERROR_OTHER


def literal_peer_trusted(host: str, nets: tuple[Network, ...]) -> bool | None:
    """Is `host` inside `trusted_peers`? True/False for IP literals and `localhost`
    (127.0.0.1 and ::1); None for DNS names, which are judged per response by the
    address the connection actually reached (`connected_peer_trusted`)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return any(ip in net for ip in _LOCALHOST for net in nets)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return in_networks(host, nets)


def connected_peer_trusted(response: httpx.Response, nets: tuple[Network, ...]) -> bool:
    """For a DNS name: trust the response if the socket's peer address is a trusted peer.

    httpx's own transports expose the connection as `network_stream`; a
    transport that does not (mocks, custom transports) earns no trust.
    """
    stream = response.extensions.get("network_stream")
    get_extra_info = getattr(stream, "get_extra_info", None)
    if get_extra_info is None:
        return False
    try:
        addr = get_extra_info("server_addr")
    except Exception:
        return False
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return in_networks(addr[0], nets)
    return False


class Upstream:
    """What the transport knows about one upstream (host[:port]) under one policy.

    `paused_until` is the only mutable field: the end (monotonic seconds) of
    the pause an upstream 429's Retry-After put on retries to this host. It
    lives in process memory, per transport.
    """

    __slots__ = (
        "attempt_timeout_s",
        "breaker",
        "breaker_key",
        "budget_key",
        "default_deadline_s",
        "fail_statuses",
        "host",
        "key",
        "paused_until",
        "policy",
        "retry",
        "retry_statuses",
        "timeout_header",
        "trusted",
    )

    def __init__(self, engine: Engine, host: str, port: int | None) -> None:
        policy = engine.policy
        cfg = policy.upstream_for(host)
        self.policy: Policy = policy
        self.host = host
        self.key = host if port is None else f"{host}:{port}"
        self.retry: RetryConfig = cfg.retry
        self.breaker: BreakerConfig | None = cfg.breaker
        self.breaker_key = "upstream:" + self.key
        # One budget per host, or one for every host of the entry (a service's instances).
        self.budget_key = "budget:" + (cfg.host if cfg.shared_budget else self.key)
        self.attempt_timeout_s = cfg.attempt_timeout_ms / 1000.0
        self.timeout_header = str(cfg.attempt_timeout_ms).encode()
        default_ms = policy.deadline.default_ms
        self.default_deadline_s = default_ms / 1000.0 if default_ms is not None else None
        self.trusted: bool | None = literal_peer_trusted(host, engine.trusted_peers)
        # A 429 is never a breaker failure (DESIGN.md): it says "slow down", not "down".
        self.fail_statuses: frozenset[int] = (
            frozenset(cfg.breaker.failure_statuses) - {429}
            if cfg.breaker is not None
            else frozenset()
        )
        retry_statuses = set(cfg.retry.on_status) - {429}
        if cfg.retry.on_429:
            retry_statuses.add(429)
        self.retry_statuses: frozenset[int] = frozenset(retry_statuses)
        self.paused_until = 0.0


# ---------------------------------------------------------------- shared core


class _Base:
    """Everything the async and sync transports share; they differ only in how they wait."""

    def __init__(
        self,
        *,
        policy: Policy | None,
        engine: Engine | None,
        clock: Clock | None,
        rng: RandomSource | None,
        store: StateStore | None,
        observer: AttemptObserver | None,
        telemetry: bool,
    ) -> None:
        self.engine = engine or Engine(policy, clock=clock, rng=rng, store=store)
        self._observer = observer
        self._telemetry = telemetry
        self._observed_engine: Engine | None = None
        self._upstreams: dict[tuple[str, int | None], Upstream] = {}

    def upstream(self, engine: Engine, url: httpx.URL) -> Upstream:
        """The (cached) upstream plan for `url` under `engine`'s policy."""
        try:  # the parsed URL's raw fields: 4x cheaper than the decoding properties
            ref = url._uri_reference
            key = (ref.host, ref.port)
        except AttributeError:  # pragma: no cover - another httpx layout
            key = (url.host, url.port)
        up = self._upstreams.get(key)
        if up is None or up.policy is not engine.policy:
            if len(self._upstreams) >= _MAX_UPSTREAMS:
                self._upstreams.clear()
            up = self._upstreams[key] = Upstream(engine, url.host, url.port)
        return up

    def observer_for(self, engine: Engine) -> AttemptObserver | None:
        """The transport's observer, else the engine's (looked up once from telemetry)."""
        if self._observer is not None:
            return self._observer
        observer = engine.attempt_observer
        if observer is None and self._telemetry and engine is not self._observed_engine:
            from ..telemetry import default_attempt_observer

            observer = engine.attempt_observer = default_attempt_observer(engine)
            self._observed_engine = engine
        return observer

    # ------------------------------------------------------------ one attempt

    @staticmethod
    def _prepare(
        ctx: DecisionContext,
        up: Upstream,
        request: httpx.Request,
        attempt: int,
        original_timeout: Mapping[str, float | None] | None,
        remaining: float | None,
    ) -> None:
        """Timeouts, headers and the attempt counter of one attempt."""
        bound = up.attempt_timeout_s
        if remaining is not None and remaining < bound:
            bound = remaining
            ms = round(remaining * 1000.0)
            timeout_header = str(ms if ms > 0 else 1).encode()
        else:
            timeout_header = up.timeout_header
        request.extensions["timeout"] = bounded_timeouts(original_timeout, bound)
        _stamp(request.headers, attempt, timeout_header)
        attempts = ctx.attempts
        attempts[up.key] = attempts.get(up.key, 0) + 1

    @staticmethod
    def _retry_decision(
        ctx: DecisionContext,
        up: Upstream,
        attempt: int,
        cause: str,
        delay_s: float,
        source: str,
        age_s: float,
        now: float,
    ) -> None:
        """The record of attempt 2, 3, ...: why, and after how long a backoff."""
        details = {"attempt": attempt, "delay_ms": round(delay_s * 1000.0, 3)}
        ctx.decisions.append(
            Decision(LAYER_RETRY, up.key, RETRY, cause, source, age_s, now, details)
        )

    @staticmethod
    def give_up(
        ctx: DecisionContext,
        up: Upstream,
        layer: str,
        reason: str,
        attempts: int,
        now: float,
        source: str = SOURCE_REQUEST,
        age_s: float = 0.0,
        **details: DetailValue,
    ) -> None:
        """Record why there is no (further) attempt; mark the context when we are exhausted.

        The verdict is `reject` when no attempt was made, `give_up` after one.
        """
        ctx.decisions.append(
            Decision(
                layer,
                up.key,
                GIVE_UP if attempts > 0 else REJECT,
                reason,
                source,
                age_s,
                now,
                {"attempts": attempts, **details},
            )
        )
        if attempts == 0 and layer in (LAYER_BREAKER, LAYER_DEADLINE) and ctx.shed_by is None:
            ctx.shed_by = layer  # refused before anything was sent
        # "attempts" with retries configured off is not exhaustion: we did
        # not retry, so the caller is the nearest owner and may.
        if reason in EXHAUSTING_REASONS and (reason != GIVE_UP_ATTEMPTS or up.retry.attempts > 1):
            ctx.upstream_exhausted = True

    def _gate_answer(
        self,
        ctx: DecisionContext,
        up: Upstream,
        gate: Gate | None,
        source: str,
        age_s: float,
        attempts: int,
        now: float,
        last_error: BaseException | None,
    ) -> None:
        """Act on the breaker's gate: raise CircuitOpen when it rejects, record probes."""
        if gate is None:
            return
        if gate.verdict == "reject":
            self.give_up(
                ctx,
                up,
                LAYER_BREAKER,
                GIVE_UP_BREAKER,
                attempts,
                now,
                source,
                age_s,
                retry_after_s=round(gate.retry_after_s, 3),
            )
            raise CircuitOpen(
                f"circuit breaker for {up.key} is {gate.state.replace('_', '-')}; "
                f"retry in {gate.retry_after_s:.3f} s",
                host=up.key,
                retry_after_s=gate.retry_after_s,
                attempts_made=attempts,
            ) from last_error
        if gate.probe_id:
            ctx.decisions.append(
                Decision(LAYER_BREAKER, up.key, PROBE, "half_open_probe", source, age_s, now)
            )

    def _deadline_passed(
        self,
        ctx: DecisionContext,
        up: Upstream,
        attempts: int,
        now: float,
        last: BaseException | None,
    ) -> DeadlineExceeded:
        self.give_up(ctx, up, LAYER_DEADLINE, GIVE_UP_DEADLINE, attempts, now)
        error = DeadlineExceeded(f"deadline exceeded before calling {up.key}", host=up.key)
        error.__cause__ = last
        return error

    def _store_failed(
        self,
        ctx: DecisionContext,
        up: Upstream,
        what: str,
        exc: Exception,
        attempts: int,
        now: float,
    ) -> bool:
        """A store operation failed: log it; True when the policy says to fail closed."""
        logger.warning(
            "fidelity_mw: outbound %s for %s without state (%s: %s)",
            what,
            up.key,
            type(exc).__name__,
            exc,
        )
        return ctx.engine.policy.state.on_error == "closed"

    def _closed_on_store_error(
        self,
        ctx: DecisionContext,
        up: Upstream,
        exc: Exception,
        attempts: int,
        now: float,
        last_error: BaseException | None,
    ) -> None:
        """The breaker could not be asked: go ahead (fallback), or refuse when failing closed."""
        if self._store_failed(ctx, up, "breaker gate", exc, attempts, now):
            self.give_up(ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts, now, SOURCE_FALLBACK)
            raise CircuitOpen(
                f"breaker state for {up.key} is unreachable and the policy fails closed",
                host=up.key,
                retry_after_s=1.0,
                attempts_made=attempts,
            ) from exc

    @staticmethod
    def _outcome(
        engine: Engine, up: Upstream, response: httpx.Response | None, error: BaseException | None
    ) -> tuple[str, bool, bool]:
        """(breaker outcome, retryable, downstream exhausted) of one finished attempt."""
        if response is not None:
            status = response.status_code
            exhausted = False
            if status >= 500:
                signal = response.headers.get(RETRY_SIGNAL_HEADER)
                if signal is not None and signal.strip().lower() == EXHAUSTED:
                    trusted = up.trusted
                    if trusted is None:
                        trusted = connected_peer_trusted(response, engine.trusted_peers)
                    exhausted = trusted
            return (
                FAILURE if status in up.fail_statuses else SUCCESS,
                status in up.retry_statuses,
                exhausted,
            )
        assert error is not None
        kind = error_kind(error)
        # Connect errors, timeouts and broken connections count against the
        # host; our own pool, bad URLs and bugs do not.
        outcome = FAILURE if kind in (ERROR_CONNECT, ERROR_TIMEOUT, ERROR_NETWORK) else IGNORED
        return outcome, retryable_error(kind, up.retry), False

    def _plan(
        self,
        engine: Engine,
        ctx: DecisionContext,
        up: Upstream,
        request: httpx.Request,
        response: httpx.Response | None,
        attempt: int,
        downstream: bool,
        breaker_state: str,
        previous_delay: float | None,
        replayable: bool,
        now: float,
    ) -> RetryPlan:
        """Retry this retryable failure? Records the give-up (but not a budget one) if not."""
        if downstream:
            plan = RetryPlan(False, 0.0, GIVE_UP_DOWNSTREAM)
        elif breaker_state == OPEN:  # our failure (or another's) just opened it: stop now
            plan = RetryPlan(False, 0.0, GIVE_UP_BREAKER)
        else:
            retry_after: float | None = None
            status: int | None = None
            if response is not None:
                status = response.status_code
                retry_after = parse_retry_after(
                    response.headers.get("retry-after"), engine.clock.wall()
                )
                if status == 429 and retry_after is not None:
                    up.paused_until = max(up.paused_until, now + retry_after)
            deadline_at = ctx.deadline_at
            plan = plan_retry(
                cfg=up.retry,
                attempt=attempt,
                idempotent=request.method in IDEMPOTENT_METHODS
                or _has_header(request.headers, _IDEMPOTENCY_KEY),
                replayable=replayable,
                downstream_exhausted=False,
                retry_after_s=retry_after,
                status=status,
                remaining_s=None if deadline_at is None else deadline_at - now,
                rng=engine.rng,
                previous_delay_s=previous_delay,
                paused_s=max(0.0, up.paused_until - now),
            )
        if not plan.retry:
            reason = plan.reason
            layer = (
                LAYER_DEADLINE
                if reason == GIVE_UP_DEADLINE
                else LAYER_BREAKER
                if reason == GIVE_UP_BREAKER
                else LAYER_RETRY
            )
            self.give_up(ctx, up, layer, reason, attempt, now)
        return plan

    def _budget_denied(
        self,
        ctx: DecisionContext,
        up: Upstream,
        answer: tuple[bool, str, float] | Exception,
        attempt: int,
        now: float,
    ) -> tuple[bool, str, float]:
        """Interpret the budget's answer (or its failure); record a denial."""
        if isinstance(answer, Exception):
            closed = self._store_failed(ctx, up, "retry budget", answer, attempt, now)
            answer = (not closed, SOURCE_FALLBACK, 0.0)
        allowed, source, age = answer
        if not allowed:
            self.give_up(ctx, up, LAYER_BUDGET, GIVE_UP_BUDGET, attempt, now, source, age)
        return not allowed, source, age

    @staticmethod
    def _record_now(
        ctx: DecisionContext,
        mem: MemoryStore,
        up: Upstream,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
    ) -> str:
        """Report the attempt's outcome to a memory-state host breaker, without awaiting."""
        try:
            return mem.record_now(
                up.breaker_key, breaker, gate, outcome, False, ctx.engine.clock.monotonic()
            )
        except Exception as exc:  # pragma: no cover - memory state does not fail
            logger.warning("fidelity_mw: could not record an outcome for %s: %s", up.key, exc)
            return ""

    @staticmethod
    def _observe_start(
        observer: AttemptObserver | None,
        ctx: DecisionContext,
        request: httpx.Request,
        attempt: int,
    ) -> Any:
        if observer is None:
            return None
        try:
            return observer.attempt_start(ctx, request, attempt)
        except Exception:
            logger.exception("fidelity_mw: attempt observer failed")
            return None

    @staticmethod
    def _call_end(observer: AttemptObserver, ctx: DecisionContext) -> None:
        """A call made outside any request is over: no RequestObserver will see it."""
        call_end = getattr(observer, "call_end", None)  # hooks.CallObserver, optional
        if call_end is None:
            return
        try:
            call_end(ctx)
        except Exception:
            logger.exception("fidelity_mw: attempt observer failed")

    @staticmethod
    def _observe_end(
        observer: AttemptObserver | None,
        token: Any,
        response: httpx.Response | None,
        error: BaseException | None,
    ) -> None:
        if observer is None:
            return
        try:
            observer.attempt_end(token, response, error)
        except Exception:
            logger.exception("fidelity_mw: attempt observer failed")


def _slow(breaker: BreakerConfig, started: float, ended: float) -> bool:
    """A slow call for the host breaker's slow-call ratio (`slow_call_ms`)."""
    limit = breaker.slow_call_ms
    return limit is not None and (ended - started) * 1000.0 >= limit


def _cause(response: httpx.Response | None, error: BaseException | None) -> str:
    """The reason recorded on the retry that follows this failure."""
    if response is not None:
        return f"status_{response.status_code}"
    assert error is not None
    return f"{error_kind(error)}_error"


# ---------------------------------------------------------------- async


class FidelityTransport(_Base, httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` that owns retries, the host breaker and the deadline.

    `inner` does the I/O (default `httpx.AsyncHTTPTransport()`). `policy`,
    `engine`, `clock`, `rng` and `store` configure the engine used outside a
    request; inside one, the middleware's engine is used. `observer` watches
    each attempt (default: the engine's, from `fidelity_mw.telemetry`, unless
    `telemetry=False`).
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        observer: AttemptObserver | None = None,
        telemetry: bool = True,
        tracer_provider: Any = None,  # OpenTelemetry's convention (docs/telemetry.md)
        meter_provider: Any = None,
    ) -> None:
        if observer is None and telemetry and (tracer_provider or meter_provider):
            from ..telemetry import telemetry_for

            observer = telemetry_for(tracer_provider, meter_provider)
        super().__init__(
            policy=policy,
            engine=engine,
            clock=clock,
            rng=rng,
            store=store,
            observer=observer,
            telemetry=telemetry,
        )
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ctx = _CURRENT.get()
        own = ctx is None
        if ctx is None:
            engine = self.engine
            now = engine.clock.monotonic()
            ctx = DecisionContext(engine, "outbound", request.method, now)
        else:
            engine = ctx.engine
            now = engine.clock.monotonic()
        clock = engine.clock
        up = self.upstream(engine, request.url)
        if own and up.default_deadline_s is not None:
            ctx.deadline_at = now + up.default_deadline_s
        cfg = up.retry
        breaker = up.breaker
        store = engine.store
        mem = store if type(store) is MemoryStore else None  # subclasses may override
        gate: Gate | None = None
        source, age = SOURCE_REQUEST, 0.0
        if mem is not None:  # budget count and first gate under one lock, no awaits
            gate = mem.outbound_begin_now(up.breaker_key, breaker, up.budget_key, cfg, now)
            if gate is not None:
                source = SOURCE_MEMORY
        else:  # a remote store: budget count and first gate in one round trip
            try:
                gate, _, source, age = await store.outbound_gate(
                    up.breaker_key, breaker, up.budget_key, cfg, False, now
                )
            except Exception as exc:
                gate, source, age = None, SOURCE_FALLBACK, 0.0
                self._closed_on_store_error(ctx, up, exc, 0, now, None)
        observer = self._observer or engine.attempt_observer
        if observer is None and self._telemetry and engine is not self._observed_engine:
            observer = self.observer_for(engine)
        original_timeout = request.extensions.get("timeout")
        # Only a body held in memory can be sent again; judged before the first
        # attempt, which consumes a streaming one (and may buffer it).
        replayable = isinstance(request.stream, httpx.ByteStream)
        inner = self.inner
        attempt = 0
        cause = ""
        delay = 0.0
        previous_delay: float | None = None
        last_error: BaseException | None = None
        prior = _take_ours(request.headers)
        try:
            while True:
                attempt += 1
                if attempt > 1:
                    now = clock.monotonic()
                deadline_at = ctx.deadline_at
                remaining = None if deadline_at is None else deadline_at - now
                if remaining is not None and remaining <= 0.0:
                    raise self._deadline_passed(ctx, up, attempt - 1, now, last_error)
                # --- the breaker, before every attempt (a remote store's gate came
                # with the budget answer, in the same round trip)
                if breaker is not None and attempt > 1 and mem is not None:
                    gate, source, age = mem.gate_now(up.breaker_key, breaker, now), "memory", 0.0
                if gate is not None and gate.verdict != "allow":
                    self._gate_answer(ctx, up, gate, source, age, attempt - 1, now, last_error)
                # --- the attempt
                self._prepare(ctx, up, request, attempt, original_timeout, remaining)
                if attempt == 1:
                    ctx.decisions.append(
                        _new_tuple(
                            Decision,
                            (
                                LAYER_RETRY,
                                up.key,
                                ALLOW,
                                "attempt",
                                source,
                                age,
                                now,
                                _FIRST_ATTEMPT,
                            ),
                        )
                    )
                else:
                    self._retry_decision(ctx, up, attempt, cause, delay, source, age, now)
                token = self._observe_start(observer, ctx, request, attempt) if observer else None
                response: httpx.Response | None = None
                error: BaseException | None = None
                try:
                    response = await inner.handle_async_request(request)
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # cancelled or interrupted: never retried
                        if gate is not None and breaker is not None:
                            if mem is not None:
                                self._record_now(ctx, mem, up, breaker, gate, IGNORED)
                            else:
                                await self._record(ctx, store, up, breaker, gate, IGNORED)
                        self._observe_end(observer, token, None, exc)
                        raise
                    error = exc
                try:
                    if (
                        response is not None
                        and (status := response.status_code) < 500
                        and (status not in up.retry_statuses)
                    ):  # the success path, inlined
                        outcome = FAILURE if status in up.fail_statuses else SUCCESS
                        retryable = downstream = False
                    else:
                        outcome, retryable, downstream = self._outcome(engine, up, response, error)
                    state = ""
                    if gate is not None and breaker is not None:
                        if mem is not None:
                            ended = clock.monotonic()
                            state = mem.record_now(
                                up.breaker_key, breaker, gate, outcome,
                                _slow(breaker, now, ended), ended,
                            )  # fmt: skip
                        else:
                            state = await self._record(
                                ctx, store, up, breaker, gate, outcome, started=now
                            )
                    if observer is not None:
                        self._observe_end(observer, token, response, error)
                    if retryable or downstream:
                        # --- a retryable failure: retry, or give up with a reason
                        now = clock.monotonic()
                        plan = self._plan(
                            engine, ctx, up, request, response, attempt, downstream, state,
                            previous_delay, replayable, now,
                        )  # fmt: skip
                        if plan.retry:
                            answer: tuple[bool, str, float] | Exception
                            next_gate: Gate | None = None
                            try:
                                if mem is not None:
                                    answer = mem.budget_try_retry_now(up.budget_key, cfg, now)
                                else:  # one round trip: the retry's budget and its gate
                                    next_gate, allowed, src, src_age = await store.outbound_gate(
                                        up.breaker_key, breaker, up.budget_key, cfg, True, now
                                    )
                                    answer = (allowed, src, src_age)
                            except Exception as exc:
                                answer = exc
                                if mem is None and breaker is not None:
                                    self._closed_on_store_error(
                                        ctx, up, exc, attempt, now, last_error
                                    )
                            denied, source, age = self._budget_denied(ctx, up, answer, attempt, now)
                            if not denied:
                                # --- release this attempt, back off, go again
                                cause = _cause(response, error)
                                last_error = error
                                delay = previous_delay = plan.delay_s
                                if mem is None:
                                    # the gate was read before the backoff: by the attempt
                                    # it is that much older, and says so
                                    gate = next_gate
                                    age += delay
                                if response is not None:
                                    await response.aclose()
                                    response = None
                                await clock.sleep(delay)  # a cancellation leaves at once
                                continue
                except BaseException:  # cancelled while deciding: do not leak the connection
                    if response is not None:
                        await response.aclose()
                    raise
                if response is None:
                    assert error is not None
                    raise error
                if own:
                    response.extensions[CONTEXT_EXTENSION] = ctx
                return response
        finally:
            _unstamp(request.headers, prior)
            if own and observer is not None:
                self._call_end(observer, ctx)

    @staticmethod
    async def _record(
        ctx: DecisionContext,
        store: StateStore,
        up: Upstream,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        started: float | None = None,
    ) -> str:
        """Report the attempt's outcome to the host breaker; the breaker's state afterwards."""
        now = ctx.engine.clock.monotonic()
        slow = started is not None and _slow(breaker, started, now)
        try:
            return await store.record(up.breaker_key, breaker, gate, outcome, slow, now)
        except Exception as exc:
            logger.warning("fidelity_mw: could not record an outcome for %s: %s", up.key, exc)
            return ""

    async def aclose(self) -> None:
        await self.inner.aclose()


# ---------------------------------------------------------------- sync


def _sync_op(store: StateStore, name: str) -> Callable[..., Any]:
    """A store operation callable from a worker thread: the store's `*_now` twin if it
    has one, else its coroutine run on the event loop of the anyio worker thread we
    are in (sync FastAPI / Starlette routes run there)."""
    twin = getattr(store, name + "_now", None)
    if twin is not None:
        return twin  # type: ignore[no-any-return]
    method = getattr(store, "breaker_gate" if name == "gate" else name)

    def bridged(*args: Any) -> Any:
        import anyio.from_thread

        return anyio.from_thread.run(method, *args)

    return bridged


class FidelitySyncTransport(_Base, httpx.BaseTransport):
    """The same layer for `httpx.Client`: sync code, including sync FastAPI routes
    (the request's context variables reach the worker thread). Backoff sleeps
    block the calling thread through `clock.sleep_sync`."""

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        observer: AttemptObserver | None = None,
        telemetry: bool = True,
        tracer_provider: Any = None,  # OpenTelemetry's convention (docs/telemetry.md)
        meter_provider: Any = None,
    ) -> None:
        if observer is None and telemetry and (tracer_provider or meter_provider):
            from ..telemetry import telemetry_for

            observer = telemetry_for(tracer_provider, meter_provider)
        super().__init__(
            policy=policy,
            engine=engine,
            clock=clock,
            rng=rng,
            store=store,
            observer=observer,
            telemetry=telemetry,
        )
        self.inner = inner if inner is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ctx = _CURRENT.get()
        own = ctx is None
        if ctx is None:
            engine = self.engine
            now = engine.clock.monotonic()
            ctx = DecisionContext(engine, "outbound", request.method, now)
        else:
            engine = ctx.engine
            now = engine.clock.monotonic()
        clock = engine.clock
        up = self.upstream(engine, request.url)
        if own and up.default_deadline_s is not None:
            ctx.deadline_at = now + up.default_deadline_s
        cfg = up.retry
        breaker = up.breaker
        store = engine.store
        mem = store if type(store) is MemoryStore else None  # subclasses may override
        gate: Gate | None = None
        source, age = SOURCE_REQUEST, 0.0
        if mem is not None:
            gate = mem.outbound_begin_now(up.breaker_key, breaker, up.budget_key, cfg, now)
            if gate is not None:
                source = SOURCE_MEMORY
        else:
            try:
                _sync_op(store, "budget_request")(up.budget_key, cfg, now)
            except Exception as exc:
                self._store_failed(ctx, up, "budget count", exc, 0, now)
        observer = self._observer or engine.attempt_observer
        if observer is None and self._telemetry and engine is not self._observed_engine:
            observer = self.observer_for(engine)
        original_timeout = request.extensions.get("timeout")
        # Only a body held in memory can be sent again; judged before the first
        # attempt, which consumes a streaming one (and may buffer it).
        replayable = isinstance(request.stream, httpx.ByteStream)
        inner = self.inner
        attempt = 0
        cause = ""
        delay = 0.0
        previous_delay: float | None = None
        last_error: BaseException | None = None
        prior = _take_ours(request.headers)
        try:
            while True:
                attempt += 1
                if attempt > 1:
                    now = clock.monotonic()
                deadline_at = ctx.deadline_at
                remaining = None if deadline_at is None else deadline_at - now
                if remaining is not None and remaining <= 0.0:
                    raise self._deadline_passed(ctx, up, attempt - 1, now, last_error)
                if breaker is not None and (attempt > 1 or mem is None):
                    try:
                        answer_gate = _sync_op(store, "gate")(up.breaker_key, breaker, now)
                        if isinstance(answer_gate, Gate):
                            gate, source, age = answer_gate, SOURCE_MEMORY, 0.0
                        else:
                            gate, source, age = answer_gate
                    except Exception as exc:
                        gate, source, age = None, SOURCE_FALLBACK, 0.0
                        self._closed_on_store_error(ctx, up, exc, attempt - 1, now, last_error)
                if gate is not None and gate.verdict != "allow":
                    self._gate_answer(ctx, up, gate, source, age, attempt - 1, now, last_error)
                self._prepare(ctx, up, request, attempt, original_timeout, remaining)
                if attempt == 1:
                    ctx.decisions.append(
                        _new_tuple(
                            Decision,
                            (
                                LAYER_RETRY,
                                up.key,
                                ALLOW,
                                "attempt",
                                source,
                                age,
                                now,
                                _FIRST_ATTEMPT,
                            ),
                        )
                    )
                else:
                    self._retry_decision(ctx, up, attempt, cause, delay, source, age, now)
                token = self._observe_start(observer, ctx, request, attempt) if observer else None
                response: httpx.Response | None = None
                error: BaseException | None = None
                try:
                    response = inner.handle_request(request)
                except BaseException as exc:
                    if not isinstance(exc, Exception):
                        if gate is not None and breaker is not None:
                            self._record_sync(ctx, store, up, breaker, gate, IGNORED)
                        self._observe_end(observer, token, None, exc)
                        raise
                    error = exc
                try:
                    if (
                        response is not None
                        and (status := response.status_code) < 500
                        and (status not in up.retry_statuses)
                    ):
                        outcome = FAILURE if status in up.fail_statuses else SUCCESS
                        retryable = downstream = False
                    else:
                        outcome, retryable, downstream = self._outcome(engine, up, response, error)
                    state = ""
                    if gate is not None and breaker is not None:
                        state = self._record_sync(
                            ctx, store, up, breaker, gate, outcome, started=now
                        )
                    if observer is not None:
                        self._observe_end(observer, token, response, error)
                    if retryable or downstream:
                        now = clock.monotonic()
                        plan = self._plan(
                            engine, ctx, up, request, response, attempt, downstream, state,
                            previous_delay, replayable, now,
                        )  # fmt: skip
                        if plan.retry:
                            answer: tuple[bool, str, float] | Exception
                            try:
                                answer = _sync_op(store, "budget_try_retry")(
                                    up.budget_key, cfg, now
                                )
                            except Exception as exc:
                                answer = exc
                            denied, source, age = self._budget_denied(ctx, up, answer, attempt, now)
                            if not denied:
                                cause = _cause(response, error)
                                last_error = error
                                delay = previous_delay = plan.delay_s
                                if response is not None:
                                    response.close()
                                    response = None
                                clock.sleep_sync(delay)
                                continue
                except BaseException:
                    if response is not None:
                        response.close()
                    raise
                if response is None:
                    assert error is not None
                    raise error
                if own:
                    response.extensions[CONTEXT_EXTENSION] = ctx
                return response
        finally:
            _unstamp(request.headers, prior)
            if own and observer is not None:
                self._call_end(observer, ctx)

    @staticmethod
    def _record_sync(
        ctx: DecisionContext,
        store: StateStore,
        up: Upstream,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        started: float | None = None,
    ) -> str:
        now = ctx.engine.clock.monotonic()
        slow = started is not None and _slow(breaker, started, now)
        try:
            state: str = _sync_op(store, "record")(
                up.breaker_key, breaker, gate, outcome, slow, now
            )
            return state
        except Exception as exc:
            logger.warning("fidelity_mw: could not record an outcome for %s: %s", up.key, exc)
            return ""

    def close(self) -> None:
        self.inner.close()
