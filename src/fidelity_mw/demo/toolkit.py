"""(c) **toolkit**: the front service built on one all-in-one resilience toolkit, nopanic.

The question it answers: "nopanic is one toolkit with retries, breakers,
retry budgets, deadlines and rate limits in one API: is that not the same
fix?" The front is built the way nopanic's README and llms.txt recommend for
an HTTP dependency, with the same thresholds as the other variants where they
map (docs/demo.md, "(c) toolkit"):

    rate limit   `keyed(rate_limit(5, per=1, burst=5, max_wait=0))`, one token
                 bucket per client (`x-client-id`), outermost: the README's
                 "one noisy tenant no longer starves the others' rate limit",
                 failing fast (`max_wait=0`, "under untrusted load") with
                 `RateLimited`, answered 429 with its `retry_after`
    deadline     `deadline(2 s)`: the client's `x-request-timeout-ms`
    retry        `retry(attempts=3, on=<transport errors, timeouts, 429, 5xx,
                 CircuitOpen>, full jitter base 100 ms cap 2 s, budget=
                 RetryBudget(ratio=0.2, min_retries_per_sec=3, window=5 s))`
                 (the README's "retrying HTTP the right way" recipe, with
                 `raise_for_status()`)
    LB           round-robin over the instances, one pick per attempt, skipping
                 an instance whose breaker is open (nopanic has no balancer, but
                 documents the breaker `state` a front reads to skip)
    breaker      `keyed(circuit_breaker(...))`, one per instance (the README's
                 "one breaker per host"): ratio 0.5, min 20 calls, window 5 s,
                 open 5 s
    timeout      `timeout(2 s)` per attempt, clamped by the deadline

`CircuitOpen` is among the retried exceptions, with `honor_retry_after=False`:
the next attempt goes to the next instance in the rotation, so waiting out
the open instance's `retry_after` (up to 5 s, past the 2 s deadline) would
turn one open breaker into a failed request. That is the most favourable
documented configuration for a fleet.

Every decision is logged into the demo's per-layer counters: the refusals,
retries and give-ups from nopanic's own event stream (`events.subscribe`),
the admissions (which nopanic does not emit) where this front's code sees
them. nopanic keeps all its state in process memory and reads it live, so by
the demo's staleness rule (docs/demo.md) every decision is on fresh data.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import httpx
from nopanic import (
    CircuitBreaker,
    CircuitOpen,
    Event,
    RateLimited,
    RetryBudget,
    circuit_breaker,
    compose,
    deadline,
    events,
    keyed,
    rate_limit,
    retry,
    timeout,
)

from .._types import ASGIApp, Receive, Scope, Send
from .fronts import (
    LOCAL,
    REQUEST,
    UPSTREAM_TIMEOUT_S,
    Caller,
    CountingTransport,
    UpstreamResult,
    front_app,
)
from .records import (
    CURRENT_RECORD,
    UPSTREAM,
    Recorder,
    RunClock,
    client_of,
    log_decision,
    send_json,
)
from .scenario import ScenarioConfig

MEMORY = "memory"  # nopanic's in-process state, read live when deciding
BUDGET_RATIO = 0.2  # the same as fidelity_mw's service budget (RetryConfig defaults)
BUDGET_MIN_PER_S = 3.0
RETRY_ATTEMPTS = 3

TOOLKIT_LAYERS = {
    "rate_limit": "nopanic keyed(rate_limit(5, per=1.0, burst=5, max_wait=0)) per x-client-id: "
    "a token bucket per client, outermost; RateLimited -> 429 with its retry_after",
    "deadline": "nopanic deadline(2 s) per request (the client's x-request-timeout-ms)",
    "retry": "nopanic retry(attempts=3, full jitter base 100 ms cap 2 s, "
    "budget=RetryBudget(ratio=0.2, min_retries_per_sec=3, window=5 s)) on transport errors, "
    "timeouts, 429, 5xx and CircuitOpen, honor_retry_after=False",
    "load_balancer": "round-robin, one pick per attempt, skipping instances whose breaker "
    "state is open (nopanic has no balancer; its breaker state is documented)",
    "breaker": "nopanic keyed(circuit_breaker(failure_threshold=0.5, min_calls=20, window=5 s, "
    "reset_timeout=5 s)) per instance; the final CircuitOpen -> 503 with its retry_after",
    "timeout": "nopanic timeout(2 s) per attempt, clamped by the deadline",
}


class SeededFullJitter:
    """nopanic's `backoff.full_jitter`, drawn from a seeded source.

    nopanic takes any iterable of floats as a backoff strategy; its own
    `full_jitter` draws from the global `random`, which the demo's seed must
    not depend on. Same formula: uniform(0, min(cap, base * 2**n)).
    """

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng

    def __iter__(self) -> Iterator[float]:
        delay = self.base
        while True:
            yield self.rng.uniform(0.0, min(delay, self.cap))
            delay *= 2.0


def _instance_failure(exc: BaseException) -> bool:
    """What a breaker counts against its instance: no answer, or a 5xx."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, (httpx.TransportError, TimeoutError))


def _retriable(exc: BaseException) -> bool:
    """The README's HTTP recipe (transport errors, timeouts, 429, 5xx), plus an open
    instance breaker: the next attempt goes to the next instance."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, (httpx.TransportError, TimeoutError, CircuitOpen))


def _what(exc: object) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"status_{exc.response.status_code}"
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    return type(exc).__name__


_GIVE_UP_LAYER = {"budget": "budget", "deadline": "deadline", "max_time": "deadline"}
_TRANSITIONS = {"open": "open", "closed": "close"}


class DecisionLog:
    """nopanic's event stream into the demo's records: one decision per event.

    Listeners run synchronously in the task that emitted the event, so the
    front request being handled (`CURRENT_RECORD`) is the one the event is about.
    """

    def __init__(self, clock: RunClock) -> None:
        self.clock = clock
        self.events = 0
        self.transitions: list[dict[str, float | str]] = []  # breaker state changes, for the report
        self._cancel: Callable[[], None] | None = events.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        self.events += 1
        data = event.data
        kind = event.kind
        subject = event.name or event.policy
        if kind == "retry.attempt_failed":
            log_decision(
                self.clock,
                "retry",
                subject,
                "retry",
                f"attempt {data.get('attempt')}: {_what(data.get('exception'))}",
                source=REQUEST,
            )
        elif kind == "retry.gave_up":
            reason = str(data.get("reason"))
            layer = _GIVE_UP_LAYER.get(reason, "retry")
            log_decision(
                self.clock,
                layer,
                subject,
                "give_up",
                f"{reason}: {_what(data.get('exception'))}",
                source=REQUEST if layer == "retry" else MEMORY,
            )
        elif kind == "breaker.rejected":
            log_decision(
                self.clock,
                "breaker",
                subject,
                "reject",
                f"open (retry_after {float(data.get('retry_after', 0.0)):.2f} s)",
                source=MEMORY,
            )
        elif kind == "breaker.state_change":
            self.transitions.append(
                {
                    "at_s": round(self.clock.now(), 3),
                    "instance": subject,
                    "event": f"{data.get('old')} -> {data.get('new')}",
                }
            )
            verdict = _TRANSITIONS.get(str(data.get("new")))
            if verdict is not None:
                log_decision(
                    self.clock,
                    "breaker",
                    subject,
                    verdict,
                    f"{data.get('old')} -> {data.get('new')}",
                    source=MEMORY,
                )
        elif kind == "ratelimit.rejected":
            log_decision(
                self.clock,
                "ratelimit",
                subject,
                "reject",
                f"token_bucket (would wait {float(data.get('would_wait', 0.0)):.2f} s)",
                source=MEMORY,
            )
        elif kind == "timeout.expired":
            log_decision(
                self.clock,
                "deadline",
                subject,
                "expire",
                f"timeout {float(data.get('seconds', 0.0)):.2f} s",
                source=MEMORY,
            )

    def close(self) -> None:
        if self._cancel is not None:
            self._cancel()
            self._cancel = None


def _by_instance(name: str, url: str) -> Hashable:
    return name


class ToolkitCaller(Caller):
    """deadline -> retry (budget) -> round-robin pick (open skipped) -> instance breaker ->
    timeout -> httpx."""

    def __init__(
        self,
        cfg: ScenarioConfig,
        urls: Sequence[str],
        names: Sequence[str],
        clock: RunClock,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        policy_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`transport` and `policy_clock` (nopanic's injectable `clock=`) are for tests."""
        self.cfg = cfg
        self.clock = clock
        self.targets = [
            (name, url.rstrip("/") + "/work") for name, url in zip(names, urls, strict=True)
        ]
        self.http = httpx.AsyncClient(
            transport=transport or CountingTransport(), timeout=UPSTREAM_TIMEOUT_S
        )
        self.breakers: keyed[CircuitBreaker] = keyed(
            lambda name: circuit_breaker(
                failure_threshold=0.5,
                min_calls=cfg.breaker_min_calls,
                window=cfg.breaker_window_s,
                reset_timeout=cfg.breaker_open_s,
                on=_instance_failure,
                name=str(name),
                clock=policy_clock,
            ),
            key=_by_instance,
        )
        self.budget = RetryBudget(
            ratio=BUDGET_RATIO,
            min_retries_per_sec=BUDGET_MIN_PER_S,
            window=cfg.breaker_window_s,
            clock=policy_clock,
        )
        self.policy = compose(
            deadline(cfg.client_attempt_timeout_s),
            retry(
                attempts=RETRY_ATTEMPTS,
                on=_retriable,
                backoff=SeededFullJitter(
                    cfg.retry_base_s, cfg.retry_max_s, random.Random(f"{cfg.seed}-nopanic")
                ),
                budget=self.budget,
                honor_retry_after=False,
                name="upstream",
            ),
        )
        self.attempt_timeout = timeout(UPSTREAM_TIMEOUT_S, name="upstream")
        self._next = itertools.count()
        self.log = DecisionLog(clock)

    def _pick(self) -> tuple[str, str, list[str]]:
        """The next instance in the rotation whose breaker is not open, and those skipped.

        nopanic documents the breaker state (`keyed(...).get(name).state`), so a
        front skips an open instance in a few lines: from the rotation's next
        index, the first instance not open; all open, the rotation's pick (its
        breaker refuses, and the retry decides).
        """
        count = len(self.targets)
        start = next(self._next)
        skipped: list[str] = []
        for step in range(count):
            name, url = self.targets[(start + step) % count]
            if self.breakers.get(name).state != "open":
                return name, url, skipped
            skipped.append(name)
        name, url = self.targets[start % count]
        return name, url, []

    async def _attempt(self) -> httpx.Response:
        """One attempt: the next instance in the rotation not open, through its breaker."""
        name, url, skipped = self._pick()
        reason = f"round_robin, skipped open {','.join(skipped)}" if skipped else "round_robin"
        log_decision(self.clock, "lb", name, "allow", reason, source=LOCAL)
        response: httpx.Response = await self.breakers.acall(self._guarded_get, name, url)
        return response

    async def _guarded_get(self, name: str, url: str) -> httpx.Response:
        """Runs only when the instance's breaker admitted the call (closed, or a probe)."""
        probe = self.breakers.get(name).state == "half_open"
        log_decision(
            self.clock,
            "breaker",
            name,
            "probe" if probe else "allow",
            "half_open" if probe else "closed",
            source=MEMORY,
        )
        response: httpx.Response = await self.attempt_timeout.acall(self.http.get, url)
        response.raise_for_status()
        return response

    async def call(self) -> UpstreamResult:
        try:
            await self.policy.acall(self._attempt)
        except CircuitOpen as exc:
            # The toolkit's own signal carries when to come back: passed on.
            return UpstreamResult(False, 503, "breaker", "circuit open", exc.retry_after)
        except TimeoutError:
            return UpstreamResult(False, 504, "deadline", "upstream timed out")
        except (httpx.HTTPStatusError, httpx.TransportError):
            return UpstreamResult(False, 503, UPSTREAM, "upstream unavailable")
        return UpstreamResult(True)

    async def aclose(self) -> None:
        self.log.close()
        await self.http.aclose()


def _client_of(client: str, *_: Any) -> Hashable:
    return client


class ToolkitLimiter:
    """The inbound per-client limit, outermost: one nopanic token bucket per client.

    `max_wait=0`: a request with no token fails at once with `RateLimited`
    (whose reservation nopanic refunds, so a refused request costs no quota),
    answered 429 with its `retry_after`. An admitted request keeps its token
    whatever the service then answers.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cfg: ScenarioConfig,
        clock: RunClock,
        policy_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.clock = clock
        self.per_client: keyed[rate_limit] = keyed(
            lambda client: rate_limit(
                cfg.limit_count,
                per=cfg.limit_period_s,
                burst=cfg.limit_count,
                max_wait=0,
                name=str(client),
                clock=policy_clock,
            ),
            key=_client_of,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = client_of(scope)
        try:
            await self.per_client.acall(self._admitted, key, scope, receive, send)
        except RateLimited as exc:
            record = CURRENT_RECORD.get()
            if record is not None:
                record.failed_by = "ratelimit"
            wait = max(1, math.ceil(exc.retry_after or 0.0))
            await send_json(
                send,
                429,
                {"error": "rate limit exceeded"},
                [(b"retry-after", str(wait).encode())],
            )

    async def _admitted(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        log_decision(self.clock, "ratelimit", key, "allow", "token_bucket", source=MEMORY)
        await self.app(scope, receive, send)


def toolkit_front(
    cfg: ScenarioConfig,
    urls: Sequence[str],
    names: Sequence[str],
    clock: RunClock,
    healthy: Callable[[float], bool],
) -> tuple[Recorder, ToolkitCaller]:
    caller = ToolkitCaller(cfg, urls, names, clock)
    limited = ToolkitLimiter(front_app(caller), cfg=cfg, clock=clock)
    return Recorder(limited, clock, healthy), caller


__all__ = ["TOOLKIT_LAYERS", "SeededFullJitter", "ToolkitCaller", "ToolkitLimiter", "toolkit_front"]
