"""The front service, in two variants that share one business endpoint (a third, on
nopanic, is in `toolkit.py`).

`GET /work` calls the upstream fleet once per request through client-side
round-robin load balancing, and answers 200 with the upstream's answer, or
an error when it got none. How the upstream is called, and which control
layers stand in front of it, is what differs:

(a) **scattered**, outermost first, each layer deciding alone:

    limiter      `limits` FixedWindowRateLimiter + MemoryStorage (what slowapi
                 runs by default): `hit()` increments the window's counter
                 *before* comparing, so rejected requests count too
    app retry    tenacity: 3 attempts, exponential backoff
    breaker      error ratio read from a metrics snapshot refreshed every few
                 seconds (stands in for a Hystrix-style breaker fed by a
                 metrics pipeline, or mesh outlier detection evaluated per
                 interval): opens at >= 50 %, stays open for a fixed time
    client retry httpx-retries RetryTransport: 3 retries on 502/503/504
    LB           an httpx transport *under* the retry transport: every retry
                 goes to the next instance in the rotation (a sidecar
                 retrying to an instance nobody chose)

(b) **fidelity**: FidelityMiddleware (deadline, route breaker, the same
    per-client rate) and FidelityTransport addressing the fleet as one
    service (`http://upstream/work`, its instances in the policy): the
    transport picks the instance of every attempt (power of two choices,
    never an ejected instance, a retry to another one, panic threshold), with
    one retry layer with jitter and a budget, one breaker per instance, and
    the deadline. The front has no load-balancing or exception-mapping code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_retries import Retry, RetryTransport
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .._types import ASGIApp, Receive, Scope, Send
from ..context import Decision, DecisionContext
from ..engine import Engine
from ..hooks import RequestObserver
from ..inbound import FidelityMiddleware
from ..outbound import FidelityTransport
from ..policy import (
    BreakerConfig,
    DeadlineConfig,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from .records import (
    CURRENT_RECORD,
    UPSTREAM,
    DemoDecision,
    Recorder,
    RunClock,
    client_of,
    log_decision,
    send_json,
)
from .scenario import ScenarioConfig

SNAPSHOT = "snapshot"  # decided on the metrics pipeline's snapshot
REQUEST = "request"  # decided on this request's own response / attempt count
LOCAL = "local"  # the load balancer's own rotation counter
POOL = httpx.Limits(max_connections=512, max_keepalive_connections=128)
UPSTREAM_TIMEOUT_S = 2.0  # per upstream call, both variants
SERVICE = "upstream"  # the fleet's logical name, for the fidelity variant
SERVICE_URL = f"http://{SERVICE}/work"


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """What a variant's upstream caller tells the business endpoint."""

    ok: bool
    status: int = 200
    failed_by: str | None = None
    reason: str = ""
    retry_after_s: float | None = None


class Caller:
    """A variant's way of calling the fleet once (with whatever layers it has)."""

    async def call(self) -> UpstreamResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- the shared endpoint


async def work(request: Request) -> Response:
    """The business endpoint: one upstream call through the variant's caller."""
    caller: Caller = request.app.state.caller
    result = await caller.call()
    record = CURRENT_RECORD.get()
    if result.ok:
        return JSONResponse({"ok": True})
    if record is not None:
        record.failed_by = result.failed_by or UPSTREAM
    headers = {}
    if result.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(result.retry_after_s)))
    return JSONResponse(
        {"error": result.reason or "upstream unavailable"},
        status_code=result.status,
        headers=headers,
    )


def front_app(caller: Caller, middleware: Sequence[Middleware] = ()) -> Starlette:
    app = Starlette(routes=[Route("/work", work)], middleware=list(middleware))
    app.state.caller = caller
    # Built now, in the setup, not by the first request of the load (Starlette's default):
    # the middleware's construction is setup, whatever it costs on a starved machine.
    app.middleware_stack = app.build_middleware_stack()
    return app


# ---------------------------------------------------------------- (a) scattered


class UpstreamMetrics:
    """The 'metrics pipeline': every upstream response, as a sidecar's stats would count it."""

    def __init__(self, clock: RunClock, horizon_s: float) -> None:
        self.clock = clock
        self.horizon_s = horizon_s
        self.events: deque[tuple[float, bool]] = deque()

    def observe(self, ok: bool) -> None:
        now = self.clock.now()
        self.events.append((now, ok))
        horizon = now - self.horizon_s
        events = self.events
        while events and events[0][0] < horizon:
            events.popleft()

    def window(self, now: float, window_s: float) -> tuple[int, int]:
        calls = errors = 0
        start = now - window_s
        for t, ok in reversed(self.events):
            if t < start:
                break
            calls += 1
            errors += not ok
        return calls, errors


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    calls: int
    errors: int

    @property
    def ratio(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


class BreakerOpenError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"breaker open; retry in {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class SnapshotBreaker:
    """A breaker that sees the error rate only through a periodically refreshed snapshot.

    Stands in for a Hystrix-style breaker whose health counts come from a
    metrics pipeline (a Prometheus scrape, a mesh's outlier detection
    evaluated every interval): error ratio over a rolling window, refreshed
    every `interval_s`; opens at `ratio` with at least `min_calls` calls;
    open for a fixed `open_s`; then one trial call (Hystrix's single test
    request): success closes it, failure re-opens it. A snapshot is acted on
    once: after closing, only a snapshot taken later can open it again.
    """

    def __init__(
        self,
        metrics: UpstreamMetrics,
        clock: RunClock,
        *,
        interval_s: float,
        window_s: float,
        ratio: float,
        min_calls: int,
        open_s: float,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.interval_s = interval_s
        self.window_s = window_s
        self.ratio = ratio
        self.min_calls = min_calls
        self.open_s = open_s
        self.snapshot = Snapshot(0.0, 0, 0)
        self.state = "closed"
        self.open_until = 0.0
        self.opened_on = self.snapshot  # the snapshot behind the current open period
        self.acted_on = -1.0  # taken_at of the last snapshot that opened the breaker
        self.trial_in_flight = False
        self.openings = 0
        self.events: list[dict[str, float | str]] = []  # transitions, for the report
        self._task: asyncio.Task[None] | None = None

    # the pipeline: refreshed on its own schedule, whatever the traffic
    def refresh(self) -> None:
        now = self.clock.now()
        calls, errors = self.metrics.window(now, self.window_s)
        self.snapshot = Snapshot(now, calls, errors)

    async def _refresher(self) -> None:
        """Refresh at fixed times, every `interval_s` from the start of the run (no drift)."""
        n = 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, n * self.interval_s - self.clock.now()))
            self.refresh()

    def start(self) -> None:
        self.refresh()
        self._task = asyncio.create_task(self._refresher())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def before(self) -> None:
        """Admit a call or raise BreakerOpenError; logs the decision with its data's age."""
        now = self.clock.now()
        snap = self.snapshot
        if self.state == "closed":
            age = now - snap.taken_at
            if (
                snap.taken_at > self.acted_on
                and snap.calls >= self.min_calls
                and snap.ratio >= self.ratio
            ):
                self.state = "open"
                self.open_until = now + self.open_s
                self.opened_on = snap
                self.acted_on = snap.taken_at
                self.openings += 1
                self._event("open", now, snap.ratio, age)
                log_decision(
                    self.clock,
                    "breaker",
                    "upstream",
                    "reject",
                    f"opens: {snap.ratio:.0%} errors in the last {self.window_s:g} s",
                    source=SNAPSHOT,
                    age_s=age,
                )
                raise BreakerOpenError(self.open_s)
            log_decision(
                self.clock, "breaker", "upstream", "allow", "closed", source=SNAPSHOT, age_s=age
            )
            return
        age = now - self.opened_on.taken_at
        if self.state == "open" and now >= self.open_until:
            self.state = "half_open"
        if self.state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            log_decision(
                self.clock, "breaker", "upstream", "probe", "trial_call", source=SNAPSHOT, age_s=age
            )
            return
        wait = max(0.05, self.open_until - now) if self.state == "open" else 0.5 * self.open_s
        log_decision(
            self.clock, "breaker", "upstream", "reject", self.state, source=SNAPSHOT, age_s=age
        )
        raise BreakerOpenError(wait)

    def after(self, ok: bool, was_trial: bool) -> None:
        if not was_trial:
            return
        self.trial_in_flight = False
        now = self.clock.now()
        if ok:
            self.state = "closed"
            self._event("close", now)
        else:
            self.state = "open"
            self.open_until = now + self.open_s
            self._event("reopen (trial failed)", now)

    def _event(self, what: str, at: float, ratio: float | None = None, age: float = 0.0) -> None:
        event: dict[str, float | str] = {"at_s": round(at, 3), "event": what}
        if ratio is not None:
            event["snapshot_error_ratio"] = round(ratio, 3)
            event["snapshot_age_s"] = round(age, 3)
        self.events.append(event)


class RoundRobinTransport(httpx.AsyncBaseTransport):
    """Client-side load balancing as an httpx transport: each call goes to the next instance.

    Under httpx-retries' RetryTransport, so every retry is a new pick: a retry
    goes to whichever instance is next in the rotation, not to one a caller
    chose. Reports every response to the metrics pipeline.
    """

    def __init__(
        self,
        urls: Sequence[str],
        metrics: UpstreamMetrics,
        clock: RunClock,
        names: Sequence[str],
    ) -> None:
        self.targets = [httpx.URL(u) for u in urls]
        self.names = list(names)
        self.metrics = metrics
        self.clock = clock
        self.inner = httpx.AsyncHTTPTransport(limits=POOL)
        self._next = itertools.count()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = next(self._next) % len(self.targets)
        target = self.targets[i]
        # httpx-retries hands the same Request object to every retry of a call
        attempt = int(request.extensions.get("demo_lb_attempt", 0)) + 1
        request.extensions["demo_lb_attempt"] = attempt
        name = self.names[i]
        if attempt > 1:
            log_decision(
                self.clock,
                "client-retry",
                name,
                "retry",
                f"attempt {attempt} -> next instance",
                source=REQUEST,
            )
        log_decision(self.clock, "lb", name, "allow", "round_robin", source=LOCAL)
        record = CURRENT_RECORD.get()
        if record is not None:
            record.upstream_calls += 1
        url = request.url.copy_with(scheme=target.scheme, host=target.host, port=target.port)
        routed = httpx.Request(
            request.method,
            url,
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self.inner.handle_async_request(routed)
        except httpx.TransportError:
            self.metrics.observe(False)
            raise
        self.metrics.observe(response.status_code < 500)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class SeededRetry(Retry):
    """httpx-retries' Retry with its backoff jitter drawn from a seeded source."""

    rng: random.Random = random.Random(0)

    def backoff_strategy(self) -> float:
        if self.backoff_factor == 0:
            return 0.0
        backoff: float = self.backoff_factor * (2**self.attempts_made)
        if self.backoff_jitter > 0:
            backoff *= self.rng.uniform(1 - self.backoff_jitter, 1)
        return min(backoff, self.max_backoff_wait)


class UpstreamStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class ScatteredCaller(Caller):
    """tenacity -> breaker -> httpx client (httpx-retries -> round-robin LB) -> instance."""

    def __init__(
        self,
        cfg: ScenarioConfig,
        urls: Sequence[str],
        names: Sequence[str],
        clock: RunClock,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metrics = UpstreamMetrics(clock, horizon_s=cfg.breaker_window_s * 2)
        self.breaker = SnapshotBreaker(
            self.metrics,
            clock,
            interval_s=cfg.snapshot_interval_s,
            window_s=cfg.breaker_window_s,
            ratio=0.5,
            min_calls=cfg.breaker_min_calls,
            open_s=cfg.breaker_open_s,
        )
        self.lb = RoundRobinTransport(urls, self.metrics, clock, names)
        SeededRetry.rng = random.Random(f"{cfg.seed}-httpx-retries")
        retry = SeededRetry(
            total=3,
            backoff_factor=cfg.sidecar_backoff_s / 2,
            status_forcelist=[502, 503, 504],
            max_backoff_wait=cfg.retry_max_s,
        )
        self.http = httpx.AsyncClient(
            transport=RetryTransport(transport=self.lb, retry=retry),
            timeout=UPSTREAM_TIMEOUT_S,
        )

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log_decision(
            self.clock,
            "app-retry",
            "upstream",
            "retry",
            f"attempt {state.attempt_number + 1} after {type(exc).__name__}",
            source=REQUEST,
        )

    async def call(self) -> UpstreamResult:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=self.cfg.retry_base_s, max=self.cfg.retry_max_s),
            retry=retry_if_exception_type((httpx.TransportError, UpstreamStatusError)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    self.breaker.before()
                    trial = self.breaker.state == "half_open"
                    try:
                        response = await self.http.get("http://fleet/work")
                    except httpx.TransportError:
                        self.breaker.after(False, trial)
                        raise
                    ok = response.status_code < 500
                    self.breaker.after(ok, trial)
                    if not ok:
                        if response.status_code in (502, 503, 504):
                            log_decision(
                                self.clock,
                                "client-retry",
                                "upstream",
                                "give_up",
                                f"retries exhausted (status {response.status_code})",
                                source=REQUEST,
                            )
                        raise UpstreamStatusError(response.status_code)
                    return UpstreamResult(True)
        except BreakerOpenError:
            # What app code does with a breaker library's "open" exception: a plain 503.
            # The breaker knows when it will close; nobody passes that on (no Retry-After).
            return UpstreamResult(False, 503, "breaker", "circuit open")
        except (httpx.TransportError, UpstreamStatusError) as exc:
            log_decision(
                self.clock,
                "app-retry",
                "upstream",
                "give_up",
                f"3 attempts: {type(exc).__name__}",
                source=REQUEST,
            )
            return UpstreamResult(False, 503, UPSTREAM, "upstream unavailable")
        return UpstreamResult(False, 503, UPSTREAM, "no attempt made")  # pragma: no cover

    async def aclose(self) -> None:
        await self.breaker.stop()
        await self.http.aclose()


class FixedWindowLimiter:
    """The scattered variant's limiter, outermost: `limits`' fixed window, as slowapi runs it.

    `FixedWindowRateLimiter.hit()` increments the window's counter and then
    compares it with the limit: a rejected request is counted like an
    admitted one, so a client that is retried or shed elsewhere burns quota.
    """

    def __init__(self, app: ASGIApp, *, rate: str, clock: RunClock) -> None:
        self.app = app
        self.item: RateLimitItem = parse(rate)
        self.strategy = FixedWindowRateLimiter(MemoryStorage())
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = client_of(scope)
        allowed = self.strategy.hit(self.item, key)
        if allowed:
            log_decision(self.clock, "ratelimit", key, "allow", "under_limit (fixed window)")
            await self.app(scope, receive, send)
            return
        stats = self.strategy.get_window_stats(self.item, key)
        # `limits` keeps its windows on the wall clock; the demo's clock has one too
        wait = max(1, math.ceil(stats.reset_time - self.clock.wall()))
        log_decision(self.clock, "ratelimit", key, "reject", "over_limit (fixed window)")
        record = CURRENT_RECORD.get()
        if record is not None:
            record.failed_by = "ratelimit"
        await send_json(
            send,
            429,
            {"error": "rate limit exceeded"},
            [(b"retry-after", str(wait).encode())],
        )


def scattered_front(
    cfg: ScenarioConfig,
    urls: Sequence[str],
    names: Sequence[str],
    clock: RunClock,
    healthy: Callable[[float], bool],
) -> tuple[Recorder, ScatteredCaller]:
    caller = ScatteredCaller(cfg, urls, names, clock)
    app = front_app(caller)
    limited = FixedWindowLimiter(app, rate=f"{cfg.limit_count}/second", clock=clock)
    return Recorder(limited, clock, healthy), caller


# ---------------------------------------------------------------- (b) fidelity_mw


def fidelity_policy(cfg: ScenarioConfig, urls: Sequence[str] = ()) -> Policy:
    """The same per-client rate and breaker thresholds as the scattered variant."""
    breaker = BreakerConfig(
        failure_ratio=0.5,
        min_calls=cfg.breaker_min_calls,
        window_s=cfg.breaker_window_s,
        open_s=cfg.breaker_open_s,
    )
    # The route breaker counts the route's own failures (500). An upstream failure
    # answered with 503 is the host breakers' evidence: counting it again here
    # would be two breakers deciding on the same facts (docs/demo.md).
    route_breaker = dataclasses.replace(breaker, failure_statuses=(500,))
    timeout_ms = int(cfg.client_attempt_timeout_s * 1000)
    # Through from_dict, so a bad URL is reported with its key path (state.url).
    state = Policy.from_dict({"state": {"url": cfg.redis_url or "memory://"}}).state
    return Policy(
        state=state,
        deadline=DeadlineConfig(default_ms=timeout_ms),
        rate_limits=(
            RateLimit(
                name="per-client",
                rate=cfg.rate,
                burst=cfg.limit_count,
                key="header:x-client-id",
                match="/work",
            ),
        ),
        breaker=route_breaker,
        upstreams=(
            UpstreamConfig(
                host=SERVICE,
                retry=RetryConfig(
                    attempts=3,
                    base_ms=max(1, round(cfg.retry_base_s * 1000)),
                    max_ms=max(1, round(cfg.retry_max_s * 1000)),
                    jitter="full",
                    budget_window_s=cfg.breaker_window_s,
                ),
                # Instance breakers are outlier detection: they also eject after 5
                # failures in a row (Envoy's consecutive_5xx default), so a fleet-wide
                # fault is known within a few calls rather than when it has outweighed
                # the window's healthy history; what they know becomes Retry-After.
                breaker=dataclasses.replace(breaker, consecutive_failures=5),
                attempt_timeout_ms=int(UPSTREAM_TIMEOUT_S * 1000),
                # one service, one budget (and one 3/s floor) for its instances
                instances=tuple(urls),
            ),
        ),
    )


class CountingTransport(httpx.AsyncBaseTransport):
    """Under FidelityTransport: counts the calls that reach the network (per front request)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=POOL)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        record = CURRENT_RECORD.get()
        if record is not None:
            record.upstream_calls += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FidelityCaller(Caller):
    """One call to the service by its logical name through FidelityTransport.

    The transport picks the instance of every attempt (a retry goes to another
    one, open breakers are skipped within the ejection bound, panic spreads
    over all): no load balancing here, and no exception mapping either (a
    refusal that escapes is the middleware's to answer).
    """

    def __init__(self, engine: Engine) -> None:
        self.transport = FidelityTransport(CountingTransport(), engine=engine)
        self.http = httpx.AsyncClient(transport=self.transport, timeout=UPSTREAM_TIMEOUT_S)

    async def call(self) -> UpstreamResult:
        response = await self.http.get(SERVICE_URL)
        if response.status_code < 500:
            return UpstreamResult(True)
        return UpstreamResult(False, 503, UPSTREAM, "upstream unavailable")

    async def aclose(self) -> None:
        await self.http.aclose()


class DecisionCopier:
    """A RequestObserver: copies each request's fidelity_mw decisions into the demo's record.

    Wraps another observer (telemetry) when there is one, so `--otlp` still exports.
    """

    def __init__(
        self,
        clock: RunClock,
        names: dict[str, str],
        inner: RequestObserver | None = None,
    ) -> None:
        self.clock = clock
        self.names = names  # "127.0.0.1:port" -> instance name, for readable subjects
        self.inner = inner
        self.contexts = 0

    def _subject(self, d: Decision) -> str:
        """An instance's name where the decision is about one (a pick names it)."""
        instance = d.details.get("instance") if d.details else None
        subject = instance if isinstance(instance, str) else d.subject
        return self.names.get(subject, subject)

    def start(self, ctx: DecisionContext, scope: Scope) -> Any:
        return self.inner.start(ctx, scope) if self.inner is not None else None

    def end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None:
        self.contexts += 1
        record = CURRENT_RECORD.get()
        if record is not None:
            copied = [
                DemoDecision(
                    self.clock.rel(d.at) if d.at else self.clock.now(),
                    d.layer,
                    self._subject(d),
                    d.verdict,
                    d.reason,
                    d.state_source,
                    d.state_age_s,
                )
                for d in ctx.decisions
            ]
            record.decisions = sorted([*record.decisions, *copied], key=lambda d: d.at)
            if ctx.outcome in ("rejected", "shed", "expired") and ctx.decided_by:
                record.failed_by = ctx.decided_by
        if self.inner is not None:
            self.inner.end(ctx, scope, token)


def fidelity_front(
    cfg: ScenarioConfig,
    urls: Sequence[str],
    names: Sequence[str],
    clock: RunClock,
    healthy: Callable[[float], bool],
    telemetry_observer: RequestObserver | None = None,
) -> tuple[Recorder, FidelityCaller, Engine]:
    policy = fidelity_policy(cfg, urls)  # a PolicyError speaks for itself (a bad state URL)
    engine = Engine(policy, rng=random.Random(f"{cfg.seed}-fidelity").random)
    caller = FidelityCaller(engine)
    by_host = {httpx.URL(u).netloc.decode(): n for u, n in zip(urls, names, strict=True)}
    observer = DecisionCopier(clock, by_host, telemetry_observer)
    app = front_app(caller, [Middleware(FidelityMiddleware, engine=engine, observer=observer)])
    # The transport looks its observer up on its first call, importing the telemetry
    # (about 0.3 s on an idle core): done here, it is setup. Left to the first call, it
    # fell into this variant's load alone, seconds of stall on a starved machine.
    caller.transport.observer_for(engine)
    return Recorder(app, clock, healthy), caller, engine
