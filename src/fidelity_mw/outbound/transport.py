"""FidelityTransport and FidelitySyncTransport: the one retry layer for httpx calls.

    client = httpx.AsyncClient(transport=FidelityTransport())
    client = httpx.Client(transport=FidelitySyncTransport())

Both drive the same attempt loop (`fidelity_mw.outbound.loop`): it decides
(instance, deadline, breaker, retry, budget, backoff) and asks for I/O by
yielding effects; the async transport awaits them, the sync one blocks on
them. Nothing else differs, but for one shortcut: the async transport makes
the commonest call (a plain upstream on in-process state, a first attempt that
ends it) in one function of its own, with the same steps in the same order
(tests/test_outbound_shortcut.py holds the two transports to the same calls).

Inside a request handled by `FidelityMiddleware` the transport uses that
request's `DecisionContext` (deadline, decisions) and the middleware's engine
(policy, state, clock). Outside one it uses its own engine and makes a
context per call, whose deadline is the policy's `deadline.default_ms`
(the context is then in `response.extensions["fidelity_context"]`).

Ownership across services: every attempt carries `x-fidelity-attempt: N`;
a >= 500 response carrying `x-fidelity-retry: exhausted` from a trusted peer
is never retried and is no failure for our breaker (the callee's control
layer produced it), and every give-up after which retrying us would multiply
load sets `ctx.upstream_exhausted`, so the middleware marks our own error
response. docs/outbound.md has the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, cast

import anyio
import anyio.lowlevel
import httpx
import httpx._transports.base  # (mypyc: the module of the transports' base classes)

from .._logs import exception as log_exception
from .._logs import warn
from .._mypyc import mypyc_attr
from .._types import Clock, RandomSource
from ..clock import SystemClock
from ..context import (
    _CURRENT,
    ALLOW,
    LAYER_RETRY,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
)
from ..decide.breaker import FAILURE, IGNORED, SUCCESS
from ..engine import Engine
from ..hooks import AttemptObserver
from ..policy import Policy
from ..state.base import LATE_ANSWER, StateStore
from . import wire as _wire
from .body import WATCHERS, Watch, watch_body
from .decisions import (
    GIVE_UP_EXTENSION,
    call_end,
    hold_flags,
    release_flags,
)
from .hedge import Race, copy_request, hedge_delay, hedgeable, run_race
from .loop import (
    _NOT_RECORDED,
    CLOSE,
    CONTEXT_EXTENSION,
    FIRST_ATTEMPT,
    GATE,
    PARK,
    READ,
    RECORD,
    REFUND,
    SEND,
    SLEEP,
    SNI_EXTENSION,
    UNTAKEN,
    WAIT,
    First,
    Local,
    Steps,
    _record_now,
    attempts,
    cells_of,
    first_attempt,
    local_ops,
    prepare,
)
from .upstream import Instance, Resolver, Upstream, resolved_problem
from .wire import (
    ATTEMPT_HEADER,
    FAST_HEADERS,
    OURS_SET,
    OWN_TIMEOUT,
    SPEND_MAX_BYTES,
    TIMEOUT_HEADER,
    own_timeouts,
    replayable,
    restore,
    unread,
    unstamp,
    worth_reading,
)

logger = logging.getLogger("fidelity_mw")
_RESOLVER_FAILED: Final = (
    "fidelity_mw: the resolver failed for %s (a host it never named instances of)"
)

_MAX_UPSTREAMS: Final = 1024
_monotonic: Final = time.monotonic
_new_tuple: Final = tuple.__new__  # a tuple subclass built without its keyword wrapper: hot path
_name: Final = operator.itemgetter(1)  # a raw header's lower-cased name
Started = First | tuple[Steps, Engine, Any]
# Module-level names the hot path reads, bound once: compiled, a `Final` name is a C
# static, where any other global is a dictionary lookup per use.
_current: Final = _CURRENT
_DECISION: Final = Decision
_OBSERVER_FAILED: Final = "fidelity_mw: attempt observer failed"  # (as `observe_start`'s)
_log_exception: Final = log_exception
_call_end: Final = call_end
_SYSTEM_CLOCK: Final = SystemClock
_BYTE_STREAM: Final = httpx.ByteStream
_GIVE_UP: Final = GIVE_UP_EXTENSION
_OWN_TIMEOUT: Final = OWN_TIMEOUT
_Watch: Final = Watch
_WATCHERS: Final = WATCHERS
_ATTEMPT_HEADER: Final = ATTEMPT_HEADER
_TIMEOUT_HEADER: Final = TIMEOUT_HEADER


def _uri_fields_fit() -> bool:
    """Does httpx keep a URL's parsed form as a tuple with the host and port third and
    fourth (`httpx._urlparse.ParseResult`)? The shortcut reads them by position."""
    ref = getattr(httpx.URL("http://h:1/"), "_uri_reference", None)
    fields = tuple(getattr(type(ref), "_fields", ()))
    return isinstance(ref, tuple) and fields[2:4] == ("host", "port") and ref[2:4] == ("h", 1)


# The async transport's shortcut reads httpx's private layouts (the raw header list, the
# parsed URL's fields): armed only where they are what it expects.
_SHORTCUT_FITS: Final = FAST_HEADERS and _uri_fields_fit()


class _Armed:
    """What the async transport's shortcut reads per call, in one object: compiled, a
    native class (field reads) beside the transport, which stays an interpreted-style
    class (the engine holds transports weakly). `engine` is the engine the shortcut
    serves (set by `_start` once it has looked its observer up), `local` a store and its
    in-process operations (one tuple: threads of the sync transport may replace it at
    once), `upstreams` the upstream plans."""

    __slots__ = ("engine", "last", "local", "seen", "upstreams")

    def __init__(self) -> None:
        self.upstreams: dict[tuple[str, int | None], Upstream] = {}
        self.engine: Engine | None = None
        # What the shortcut reads of `engine` per call, read once when it was armed (a
        # compiled read of an interpreted object's attribute is a dictionary lookup):
        # dropped when the engine changes (`Engine.__setattr__` -> `engine_changed`).
        self.seen: _Seen | None = None
        self.local: tuple[StateStore | None, Local | None] = (None, None)
        # The host, port and upstream plan of the shortcut's last call, with the `seen` it
        # was checked against (a plain upstream under that engine's policy): a client
        # calls one host over and over, and comparing a host is cheaper than building and
        # hashing a key (None: look it up in `upstreams`). One tuple, replaced whole:
        # threads may call one transport at once, and fields could be read half-written.
        self.last: tuple[str, int | None, Upstream, _Seen] | None = None


class _Seen:
    """The engine's values the shortcut reads per call (`_Armed.seen`): built whole, so
    threads that arm one transport at once never see half of one engine's."""

    __slots__ = (
        "clock", "engine", "local", "mark", "now", "observer", "policy", "resolver", "store"
    )  # fmt: skip

    def __init__(
        self,
        engine: Engine,
        observer: AttemptObserver | None,
        local: Local,
        resolver: Resolver | None = None,
    ) -> None:
        self.engine = engine
        self.resolver = resolver  # (the transport's: asked on every call, `_Base._resolve`)
        self.policy = engine.policy
        self.mark = engine.plan_mark  # (the plans the shortcut may use: `Upstream.mark`)
        self.store = engine.store
        self.local = local  # (the store's in-process operations: a store replaced drops it)
        self.observer = observer  # (the transport's own, else the engine's)
        self.clock = clock = engine.clock
        # The shortcuts' clock read, chosen once here rather than by a test of the clock's
        # type at each read (the system clock's method only calls time.monotonic)
        self.now: Callable[[], float] = (
            _monotonic if type(clock) is SystemClock else clock.monotonic
        )


_ASYNC_IN_SYNC_CLIENT: Final = (
    "FidelityTransport is an async transport, for httpx.AsyncClient; "
    "httpx.Client needs FidelitySyncTransport: "
    "httpx.Client(transport=FidelitySyncTransport())"
)
_SYNC_IN_ASYNC_CLIENT: Final = (
    "FidelitySyncTransport is a sync transport, for httpx.Client; "
    "httpx.AsyncClient needs FidelityTransport: "
    "httpx.AsyncClient(transport=FidelityTransport())"
)


def _forget_breakers(engine: Engine, gone: list[Instance], own: object) -> list[Instance]:
    """The breakers of instances the resolver no longer names, forgotten where they are
    this process's alone (the memory store's `forget_breakers`): kept, every address a
    rolling restart or a rescheduled pod left behind held its breaker (an open one never
    goes idle) until the store's cap (10,000) swept them. Not one another plan of the
    engine's transports still calls (an instance of another service, a plain host), nor
    one with a call in flight (its outcome would make it again). A fleet's breakers on
    Redis stay: other processes may still call the instance, and their keys expire.
    An instance named again starts with a closed breaker, as with a fresh balancer view
    (Envoy forgets a host's outlier state when discovery drops it). Returns the instances
    left for their calls in flight, to forget once those end (`_Base._forget_later`)."""
    forget = getattr(engine.store, "forget_breakers", None)
    if forget is None:
        return []
    keys = {i.breaker_key for i in gone if i.outstanding <= 0}
    for transport in {own, *engine.transports}:
        for first in list(getattr(transport, "_upstreams", {}).values()):
            plan: Upstream | None = first
            while plan is not None:  # (and the plans it parked: another engine's)
                if plan.instances is None:
                    keys.discard(plan.breaker_key)
                else:
                    for instance in plan.instances:
                        keys.discard(instance.breaker_key)
                plan = plan.parked
    if keys:
        forget(sorted(keys))
    return [i for i in gone if i.outstanding > 0]


@mypyc_attr(native_class=False)  # the engine holds transports weakly
class _Base:
    """The transports' shared setup: engine, upstream plans, observer, store operations."""

    inner: Any

    def __init__(
        self,
        inner: Any = None,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        observer: AttemptObserver | None = None,
        telemetry: bool = True,
        resolver: Resolver | None = None,
        tracer_provider: Any = None,  # OpenTelemetry's convention (docs/telemetry.md)
        meter_provider: Any = None,
    ) -> None:
        if observer is None and telemetry and (tracer_provider or meter_provider):
            from ..telemetry import telemetry_for

            observer = telemetry_for(tracer_provider, meter_provider)
        self.inner = inner if inner is not None else self._default_inner()
        wrong = self._wrong_inner(self.inner)
        if wrong is not None:
            raise TypeError(wrong)
        self._shut: list[bool] = [False]  # closed: every plan of this transport shares it
        self._proxied = _through_proxy(self.inner)
        retries = _own_retries(self.inner)
        if retries:
            logger.warning(
                "fidelity_mw: the inner transport retries failed connects itself "
                "(retries=%d): up to %d connects in every attempt of fidelity_mw's, with "
                "httpcore's own sleeps between them that no timeout or deadline bounds; "
                "build it with retries=0 (httpx's default) and let [upstream.retry] decide",
                retries,
                retries + 1,
            )
        self.engine = engine or Engine(policy, clock=clock, rng=rng, store=store)
        # A policy given here that a request's middleware overrides: said once (below).
        self._own_policy = self.engine.policy if policy is not None or engine else None
        self._observer = observer
        self._telemetry = telemetry
        self._resolver = resolver
        self._bad_answers: dict[str, str] = {}  # host -> the resolver answer's problem logged
        # Instances the resolver dropped while a call to them was out, with their engine:
        # their breakers are forgotten at a resolver answer after those calls end
        self._gone_busy: list[tuple[Engine, Instance]] = []
        # Taking a changed resolver answer (`_resolved`), and `_gone_busy`'s updates: the
        # sync transport's threads (or event loops in several threads) take them at once
        self._resolving = threading.Lock()
        self._observed_engine: Engine | None = None
        self._armed = armed = _Armed()
        self._upstreams = armed.upstreams
        self.engine.transports.add(self)  # for the admin page's balancer view
        if observer is None and telemetry:
            # Now, not at the first call: looking it up imports the telemetry modules
            # (~0.3 s on an idle core), a stall of the loop inside a service's first call.
            self.observer_for(self.engine)

    @staticmethod
    def _default_inner() -> Any:
        raise NotImplementedError

    @staticmethod
    def _wrong_inner(inner: Any) -> str | None:
        """Why `inner` cannot do this transport's I/O (None: it can)."""
        return None

    def _shut_bodies(self) -> None:
        """Closing: a body handed out so far and cut by the close is not reported as the
        upstream's break (outbound/body.py). A transport used again after its close (the
        inner pool opens new connections) reports the bodies of its new calls: a new flag
        for its plans."""
        self._shut[0] = True
        self._shut = [False]
        for plan in list(self._upstreams.values()):
            up: Upstream | None = plan
            while up is not None:
                up.shut = self._shut
                up = up.parked

    def upstream(self, engine: Engine, url: httpx.URL) -> Upstream:
        """The (cached) upstream plan for `url` under `engine`'s policy."""
        try:  # the parsed URL's raw fields: 4x cheaper than the decoding properties
            ref = url._uri_reference
            key = (ref.host, ref.port)
        except AttributeError:  # pragma: no cover - another httpx layout
            key = (url.host, url.port)
        up = self._upstreams.get(key)
        if up is None or up.mark is not engine.plan_mark:
            if len(self._upstreams) >= _MAX_UPSTREAMS:
                self._evict(engine.clock.monotonic())
            old, up = up, None
            if old is not None:
                parked, old.parked = old.parked, None  # at most one parked plan per host
                if parked is not None and parked.mark is engine.plan_mark:
                    # Back to the policy used before: its plan, with what its balancer
                    # learned (latencies, calls in flight, 429 pauses), not a new one.
                    up = parked
            if up is None:
                up = Upstream(engine, url.host, url.port)
                # the admin page of the engine the plan is for lists this transport's
                # balancers (a transport built without one is used under a middleware's)
                engine.transports.add(self)
            up.parked = old
            self._upstreams[key] = up
            up.proxied = self._proxied
            up.shut = self._shut
            if old is not None:
                up.inherit(old)  # (what its first answer said of the host)
            own = self._own_policy
            if own is not None and engine is not self.engine and engine.policy != own:
                self._own_policy = None  # once per transport
                logger.warning(
                    "fidelity_mw: a FidelityTransport built with its own policy is used "
                    "inside a request handled by FidelityMiddleware: the middleware's policy "
                    "applies there (put the [[upstream]] tables in the middleware's policy)"
                )
        if self._resolver is not None:
            self._resolve(engine, up)
        return up

    def _resolve(self, engine: Engine, up: Upstream) -> None:
        """Ask the resolver for the host's instances, and take its answer (`_resolved`)."""
        resolver = self._resolver
        if resolver is not None:
            try:
                urls = resolver(up.host)
            except Exception as exc:  # discovery down: the instances it named last answer
                failure = f"raised {exc!r}"
                if self._bad_answers.get(up.host) != failure:  # once per failure, not per call
                    self._bad_answers[up.host] = failure
                    if up.last_answer:  # a host it answered for: its discovery is down
                        logger.exception("fidelity_mw: the resolver failed for %s", up.host)
                    else:
                        # A host it never answered for: a resolver that raises for every
                        # host it does not know (an SRV lookup, a registry's KeyError)
                        # logged an ERROR with its traceback for each new host the
                        # transport calls (webhooks: thousands). Once per interval and
                        # kind of failure, with a count of those left out.
                        warn(
                            logger, f"resolver:{type(exc).__name__}", _RESOLVER_FAILED,
                            up.host, level=logging.ERROR, exc_info=True,
                        )  # fmt: skip
            else:
                if urls:
                    self._resolved(engine, up, urls)

    def _evict(self, now: float) -> None:
        """Make room in the table of upstream plans (it is full): the plans of plain hosts
        go, but not a service's (its instances' load, latency and breaker states are
        what the balancer knows) nor a host's whose 429 pause still runs; of those, the
        newest half of the table at most stay (the bound holds whatever the calls)."""
        table = self._upstreams
        keep = [
            (key, up)
            for key, up in table.items()
            if up.instances is not None or up.paused_until > now
        ][-(_MAX_UPSTREAMS // 2) :]
        table.clear()
        table.update(keep)
        self._armed.last = None  # a plan no longer in the table: not the shortcut's
        # What the resolver said of the hosts whose plans went, with them: a resolver that
        # fails for every host it does not know, under calls to ever-new hosts (webhook
        # URLs, an upstream that redirects to a new host each time), kept one per host.
        hosts = {up.host for _key, up in keep}
        bad = self._bad_answers
        for host in list(bad):  # (a copy: the sync transport's threads may add one)
            if host not in hosts:
                bad.pop(host, None)

    def _resolved(self, engine: Engine, up: Upstream, urls: Sequence[str]) -> None:
        """Take a resolver's answer. One the same as the last (good or bad) is not
        checked again: a resolver that returns its cached list costs no validation
        per call, and a bad answer is reported once, not per call."""
        if self._gone_busy:
            self._forget_later()
        try:
            answer: tuple[object, ...] = (urls,) if isinstance(urls, str | bytes) else tuple(urls)
        except TypeError:  # not a sequence at all: refused below like any bad answer
            answer = (urls,)
        if answer == up.last_answer:
            if self._bad_answers.get(up.host, "").startswith("raised "):
                del self._bad_answers[up.host]  # answering again after a failure
            return
        problem = resolved_problem(urls)  # (the caller's object read outside the lock)
        with self._resolving:
            # The answer noted and its instances named as one step: a thread holding an
            # older answer that named its instances after another thread's newer answer
            # was noted left the older instances under the newer note, which every later
            # call (the same newer answer) took as already taken, for good.
            up.last_answer = answer
            if problem is None:
                gone = up.set_instances(engine, cast(tuple[str, ...], answer))
                if gone and up.breaker is not None:
                    busy = _forget_breakers(engine, gone, self)
                    if busy:
                        # (bounded: a call that never ends must not make this grow)
                        self._gone_busy = [*self._gone_busy, *((engine, i) for i in busy)][-256:]
                self._bad_answers.pop(up.host, None)
                return
        if self._bad_answers.get(up.host) != problem:
            # like a resolver down: the instances it named last still answer
            self._bad_answers[up.host] = problem
            logger.warning(
                "fidelity_mw: the resolver's answer for %s is ignored: %s", up.host, problem
            )

    def _forget_later(self) -> None:
        """The breakers of dropped instances whose calls were in flight at the drop
        (`_forget_breakers` left them: the outcome would have made them again), now that
        those calls ended. Kept, a service with traffic, whose instances mostly have a call
        out when a rolling replacement drops them, kept nearly every old address's breaker
        (an open one for good) as if nothing were forgotten."""
        if not any(i.outstanding <= 0 for _engine, i in self._gone_busy):
            return
        with self._resolving:  # (another thread's additions are kept, not overwritten)
            waiting = self._gone_busy
            ended = [(engine, i) for engine, i in waiting if i.outstanding <= 0]
            # (a new list, not changed in place: the sync transport's threads read it)
            self._gone_busy = [(engine, i) for engine, i in waiting if i.outstanding > 0]
        for engine in {id(engine): engine for engine, _ in ended}.values():
            _forget_breakers(engine, [i for e, i in ended if e is engine], self)

    def engine_changed(self, engine: Engine) -> None:
        """`engine` changed (`Engine.__setattr__`): what the shortcut read of it goes, and
        a new clock's plans forget the times they read on the old one (`new_clock`)."""
        seen = self._armed.seen
        if seen is not None and seen.engine is engine:
            self._armed.seen = None
        clock = getattr(engine, "clock", None)  # (not `__dict__`: see `Engine.__setattr__`)
        if clock is None:
            return
        for plan in list(self._upstreams.values()):
            up: Upstream | None = plan
            while up is not None:
                if up.clock is not clock and up.mark is engine.plan_mark:
                    up.new_clock(clock)
                up = up.parked

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

    def _start(self, request: httpx.Request, hedging: bool = False) -> Started:
        """The call's first attempt when `First` makes it (a plain upstream on in-process
        state, unhedged), else its attempt loop, its engine, and (async, for a hedged call)
        what the race needs: `(race, hedge config, a maker of hedge loops, upstream,
        context, the observer whose call_end ends the call or None)`. `hedging`: the
        async transport's call (it may hedge, and its shortcut may be armed)."""
        ctx = _current.get()
        engine = self.engine if ctx is None else ctx.engine
        if ctx is not None and ctx.response_complete:
            ctx = None  # after the response (a background task): a call of its own
        own = ctx is None
        clock = engine.clock
        # The system clock's method only calls time.monotonic: read it directly.
        now = _monotonic() if type(clock) is _SYSTEM_CLOCK else clock.monotonic()
        if ctx is None:
            ctx = DecisionContext(engine, "outbound", request.method, now)
        try:  # the parsed URL's raw fields: 4x cheaper than the decoding properties
            ref = request.url._uri_reference
            up = self._upstreams.get((ref.host, ref.port))
        except AttributeError:  # pragma: no cover - another httpx layout
            up = None
        if up is None or up.mark is not engine.plan_mark or self._resolver is not None:
            up = self.upstream(engine, request.url)
        if own and up.default_deadline_s is not None:
            ctx.deadline_at = now + up.default_deadline_s
        observer = self._observer or engine.attempt_observer
        if observer is None and self._telemetry and engine is not self._observed_engine:
            observer = self.observer_for(engine)
        store = engine.store
        armed = self._armed
        cached = armed.local
        if cached[0] is not store:
            cached = armed.local = (store, local_ops(store))
        local = cached[1]
        hedge = up.hedge
        hedged = hedging and hedge is not None and hedgeable(request, up.retry_methods)
        if local is not None and not hedged:  # (a service's too: `first_attempt`)
            if hedging and hedge is None and _SHORTCUT_FITS:
                # The async transport's shortcut may skip all of this (a service's call,
                # all but `first_attempt`: `_service`). (The engine lists the transport, so
                # a change of the engine drops what was read here.) The sync transport has
                # none: arming it cost each of its calls a `_Seen` and an add to the
                # engine's weak set, shared by every thread.
                engine.transports.add(self)
                armed.seen = _Seen(
                    engine, self._observer or engine.attempt_observer, local, self._resolver
                )
                armed.engine = engine
            return first_attempt(ctx, up, request, own, observer, now, local)
        if hedged:
            assert hedge is not None
            race = Race(hedge_delay(hedge.after, hedge.after_ms, hedge.min_samples, up.window))
            spawn = _spawner(ctx, engine, up, request, observer, local, race)

            # The call ends when the race does: the transport, not a loop, ends it.
            steps = attempts(ctx, engine, up, request, False, observer, now, local, race)
            return steps, engine, (race, hedge, spawn, up, ctx, observer if own else None)
        return attempts(ctx, engine, up, request, own, observer, now, local), engine, None


def _own_retries(inner: object) -> int:
    """The connect retries an httpx transport makes itself (`HTTPTransport(retries=N)`:
    its httpcore pool's), 0 when it makes none or does not say."""
    retries = getattr(getattr(inner, "_pool", None), "_retries", 0)
    return retries if type(retries) is int and retries > 0 else 0


# httpcore's proxy pools (what `httpx.HTTPTransport(proxy=...)` holds), by name: the SOCKS
# ones load only with the socks extra.
_PROXY_POOLS: Final = frozenset({"AsyncHTTPProxy", "HTTPProxy", "AsyncSOCKSProxy", "SOCKSProxy"})


def _through_proxy(inner: object) -> bool:
    """Does this httpx transport reach its upstreams through a proxy?"""
    return type(getattr(inner, "_pool", None)).__name__ in _PROXY_POOLS


def _spawner(
    call: DecisionContext,
    engine: Engine,
    up: Upstream,
    request: httpx.Request,
    observer: AttemptObserver | None,
    local: Local | None,
    race: Race,
) -> Callable[[], Steps]:
    """A maker of hedge loops for one call (module level: mypyc compiles no closure in
    a method of a class it leaves interpreted-style)."""
    url = request.url
    own_sni = request.extensions.get(SNI_EXTENSION)  # the caller's, before the first loop's

    def spawn() -> Steps:
        # Copied when needed (most calls never hedge), from what the first loop
        # leaves intact: its own stamps are taken off again by the hedge's loop, and the
        # TLS name it set for its instance is the hedge loop's to set for its own.
        again = copy_request(request, url)
        if own_sni is None:
            again.extensions.pop(SNI_EXTENSION, None)
        start = engine.clock.monotonic()
        return attempts(call, engine, up, again, False, observer, start, local, race, True)

    return spawn


class _Stepper:
    """Runs the loop's generator: the last effect's result (or exception) goes back in."""

    __slots__ = ("result", "steps", "thrown", "value")

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.value: Any = None
        self.thrown: BaseException | None = None
        self.result: httpx.Response

    def next(self) -> tuple[Any, ...] | None:
        """The next effect; None when the call is over (its response is in `result`)."""
        thrown = self.thrown
        try:
            if thrown is None:
                return self.steps.send(self.value)
            self.thrown = None
            return self.steps.throw(thrown)
        except StopIteration as done:
            self.result = done.value
            return None


# ---------------------------------------------------------------- async


@mypyc_attr(native_class=False)  # the engine holds transports weakly
class FidelityTransport(_Base, httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` that owns retries, the host breaker and the deadline,
    and balances a service's instances.

    `inner` does the I/O (default `httpx.AsyncHTTPTransport()`). `policy`,
    `engine`, `clock`, `rng` and `store` configure the engine used outside a
    request; inside one, the middleware's engine is used. `observer` watches
    each attempt (default: the engine's, from `fidelity_mw.telemetry`, unless
    `telemetry=False`). `resolver(host)` may name the instance base URLs of a
    logical host (docs/outbound.md, services).
    """

    inner: httpx.AsyncBaseTransport

    @staticmethod
    def _default_inner() -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    @staticmethod
    def _wrong_inner(inner: Any) -> str | None:
        if hasattr(inner, "handle_async_request"):
            return None
        return (
            f"FidelityTransport's inner transport must be async (an httpx.AsyncBaseTransport "
            f"such as httpx.AsyncHTTPTransport()); got {type(inner).__name__}. For "
            f"httpx.Client and a sync inner transport use FidelitySyncTransport"
        )

    # httpx.Client calls these on its transport: without them a sync client given this
    # async transport failed with an AttributeError that named neither class.
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise TypeError(_ASYNC_IN_SYNC_CLIENT)

    def __enter__(self) -> FidelityTransport:
        raise TypeError(_ASYNC_IN_SYNC_CLIENT)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # The common call, inlined (it is most calls, and every Python call and tuple
        # costs here): a plain upstream (no instances, no hedging) on in-process state,
        # a deadline not yet passed, request timeouts seen last time (when the deadline
        # leaves the whole attempt timeout), no header of ours set by the caller, a
        # breaker plainly closed (or none), and a first attempt that ends the call. The
        # same steps as `first_attempt` and `First.finish`, in the same order: anything
        # else is handed to them, from the step it has reached.
        ctx = _current.get()
        if ctx is None:
            engine = self.engine
        else:
            engine = ctx.engine
            if ctx.response_complete:
                ctx = None  # after the response (a background task): a call of its own
        armed = self._armed
        try:  # the parsed URL's raw fields, by position (`_SHORTCUT_FITS` checked them)
            ref = request.url._uri_reference
            host: str = ref[2]
            port: int | None = ref[3]
        except (AttributeError, LookupError, TypeError):  # pragma: no cover - another layout
            return await self._handle(request)
        seen = armed.seen
        last = armed.last
        # (compared field by field: a slice and a tuple compare are fewer bytecodes but
        # more machine instructions, a new tuple and an unspecialized compare per call)
        if last is not None and last[0] == host and last[1] == port and last[3] is seen:
            up = last[2]  # (checked against `seen` when it was noted: plain, its policy)
            known = seen
        elif (
            seen is not None
            and (plan := armed.upstreams.get((host, port))) is not None
            and plan.mark is seen.mark
        ):
            if seen.resolver is not None:
                # A resolver's host: asked on every call, as `_start` asks it (once, and
                # only where the call stays here), then as what it named: a service, or
                # a plain host on this path. (Never `last`: that skips the asking.)
                if seen.engine is not engine or plan.hedge is not None:
                    return await self._handle(request)
                self._resolve(engine, plan)
                if not plan.plain:
                    return await self._service(request, ctx, engine, plan, seen)
            elif not plan.plain:  # a service's (or a hedged upstream's): not the shortcut's
                return await self._service(request, ctx, engine, plan, seen)
            else:
                armed.last = (host, port, plan, seen)
            up, known = plan, seen
        else:
            armed.last = None  # (`_start` may replace the plan)
            return await self._handle(request)
        if known.engine is not engine:
            armed.last = None
            return await self._handle(request)
        # (`_start` looked the engine's observer and the store's operations up before it
        # armed the shortcut; a change of the engine, its store's included, drops them)
        local = known.local
        observer = known.observer
        read_clock = known.now
        now = read_clock()
        if ctx is None:
            own = True
            ctx = DecisionContext(engine, "outbound", request.method, now)
            # (its deadline known here: read back, the class default's read is not
            # specialized interpreted, ~200 machine instructions)
            remaining = up.default_deadline_s
            if remaining is not None:
                remaining = ctx.deadline_at = now + remaining
        else:
            own = False
            remaining = ctx.deadline_at
        extensions = request.extensions
        timeouts = extensions.get("timeout")
        if _OWN_TIMEOUT in extensions:  # a request sent again: its own timeouts
            timeouts = own_timeouts(extensions)
        if _GIVE_UP in extensions:  # a request sent again: its last call's give-up
            del extensions[_GIVE_UP]
        noted = up.timeouts
        raw = request.headers._list  # (armed only with FAST_HEADERS: `_start`)
        tight = False  # the deadline caps the attempt timeout
        if remaining is not None:
            remaining -= now
            if remaining < up.uncut_s:
                if remaining <= 0.0:  # passed already: `first_attempt` says so
                    return await self._first(ctx, up, request, own, observer, now, local, UNTAKEN)
                tight = True
        if not tight and (noted is None or timeouts != noted[0]):
            return await self._first(ctx, up, request, own, observer, now, local, UNTAKEN)
        if not OURS_SET.isdisjoint(map(_name, raw)):  # the caller set a header of ours
            return await self._first(ctx, up, request, own, observer, now, local, UNTAKEN)
        # Taken before the attempt (which may consume it, or buffer it and replace it with
        # the bytes read); judged only when a failure needs it: whether a body can be sent
        # again is its class's and its files' (`replayable`), not what reading it did.
        stream = request.stream
        cells = up.cells  # (`cells_of`, inlined: the plan's handle on its breaker and budget)
        if cells.home is not local:
            cells = cells_of(up, local)
        try:
            gate = local.begin_at(cells, now)
        except Exception as exc:
            return await self._first(ctx, up, request, own, observer, now, local, exc)
        if gate is None:
            source = SOURCE_REQUEST
        elif gate.verdict == "allow":
            source = SOURCE_MEMORY
        else:
            return await self._first(ctx, up, request, own, observer, now, local, gate)
        try:
            if tight:
                stamped = up.first_stamps  # (empty: not told our headers, `prepare` stamps none)
                prepare(ctx, up, request, 1, timeouts, remaining)
                capped = None
            else:
                assert noted is not None
                capped = noted[1]
                if capped is not None:  # (`attempt_timeouts`, for the timeouts it saw last)
                    request.extensions["timeout"] = dict(capped)
                stamped = noted[2]  # (the first attempt's headers for those timeouts)
                raw += stamped
                # (the `attempts` property, without its call; a call of its own has none
                # yet, and its read would be the class default's)
                counts = None if own else ctx._attempts
                if counts is None:
                    ctx._attempts = {up.key: 1}
                else:
                    counts[up.key] = counts.get(up.key, 0) + 1
            decision = _new_tuple(
                _DECISION, (LAYER_RETRY, up.key, ALLOW, "attempt", source, 0.0, now, FIRST_ATTEMPT)
            )
            if ctx._pending is None and len(ctx._decisions) < ctx._room_at:
                ctx._decisions.append(decision)
            else:  # the admission's records built first, or room made (a long request)
                ctx.decisions.append(decision)
            if observer is None:
                token = saved = None
            else:  # (the headers before it injects trace context: `restore`)
                saved = raw[:]  # (`snapshot`, inlined: `raw` is the request's list still)
                try:  # `observe_start`, inlined: a failing observer is logged, not raised
                    token = observer.attempt_start(ctx, request, 1)
                except Exception:
                    token = None
                    _log_exception(logger, "observer", _OBSERVER_FAILED)
        except BaseException:  # as `first_attempt`: nothing of ours stays on the request
            unstamp(request.headers, None)  # (nothing injected: it is the try's last step)
            if own and observer is not None:
                _call_end(observer, ctx)
            raise
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException as exc:
            can_replay = type(stream) is _BYTE_STREAM or replayable(stream)
            first = _new_tuple(
                First,
                (ctx, up, request, own, observer, now, local, gate, source, None, token, timeouts,
                 can_replay, saved, None),
            )  # fmt: skip
            return await self._drive(first.resume(None, exc), engine)
        if up.listening:  # (a name the rule could not place: its first answer's address)
            up.heard(response, engine)
        status = response.status_code
        if status >= 500 or status in up.retry_statuses:
            can_replay = type(stream) is _BYTE_STREAM or replayable(stream)
            first = _new_tuple(
                First,
                (ctx, up, request, own, observer, now, local, gate, source, None, token, timeouts,
                 can_replay, saved, None),
            )  # fmt: skip
            return await self._drive(first.resume(response, None), engine)
        breaker = up.breaker
        if gate is not None and breaker is not None:
            ended = read_clock()
            outcome = FAILURE if status in up.fail_statuses else SUCCESS
            if breaker.slow_call_ms is None:  # `_record_now` without its call: never slow
                try:
                    local.record_at(cells, gate, outcome, False, ended)
                except Exception as exc:  # a lost outcome is logged, not raised
                    logger.warning(_NOT_RECORDED, up.key, exc)
            else:
                _record_now(local, up, up.breaker_key, gate, outcome, now, ended)
            if outcome == SUCCESS and response.stream.__class__ is not _BYTE_STREAM:
                # (its body still to be read: a break there fails the call after all)
                body = response.stream
                watch = _new_tuple(
                    _Watch,
                    (ctx, up.key, None, local, up.breaker_key, breaker, gate, source, None,
                     up.shut, 1, up.attempt_timeout_s),
                )  # fmt: skip
                watcher = _WATCHERS.get(body.__class__)
                if watcher is None:  # (a class of body not seen yet: `watch_body` learns it)
                    watch_body(response, watch)
                else:
                    response.stream = watcher(body, watch)
        if observer is not None:
            try:  # `observe_end`, inlined
                observer.attempt_end(token, response, None)
            except Exception:
                _log_exception(logger, "observer", _OBSERVER_FAILED)
            if tight:
                restore(request.headers, None, saved)  # (and what the observer injected)
            else:  # `restore`, inlined: the copy less our headers, its last (`raw += stamped`)
                assert saved is not None
                request.headers._list[:] = saved[: len(saved) - len(stamped)]
        else:  # `unstamp`, inlined: the request's list now (the inner may replace it)
            raw = request.headers._list
            # (by the names' identity: comparing the last two with `stamped` is fewer
            # bytecodes but, compiled, a new list and a generic compare per call)
            if len(raw) >= 2 and raw[-1][1] is _TIMEOUT_HEADER and raw[-2][1] is _ATTEMPT_HEADER:
                del raw[-2:]
            elif stamped:  # (moved by the inner transport: taken off wherever they are)
                unstamp(request.headers, None)
        if tight or capped is not None:  # (the attempt's timeouts stay for its body)
            extensions[_OWN_TIMEOUT] = (extensions.get("timeout"), timeouts)
        if own:
            response.extensions[CONTEXT_EXTENSION] = ctx
            if observer is not None:
                _call_end(observer, ctx)
        return response

    async def _service(
        self,
        request: httpx.Request,
        ctx: DecisionContext | None,
        engine: Engine,
        up: Upstream,
        known: _Seen,
    ) -> httpx.Response:
        """A call to a service (an upstream with instances, unhedged) under the engine the
        shortcut was armed for: what `_start` would find, read from what it armed
        (`known`), and its first attempt by `first_attempt`, to the instance the loop's
        own step picks. Anything else is `_handle`'s."""
        if up.hedge is not None or known.engine is not engine:
            return await self._handle(request)
        local = known.local
        now = known.now()
        own = ctx is None
        if ctx is None:
            ctx = DecisionContext(engine, "outbound", request.method, now)
            if up.default_deadline_s is not None:
                ctx.deadline_at = now + up.default_deadline_s
        return await self._first(ctx, up, request, own, known.observer, now, local, UNTAKEN)

    async def _first(
        self,
        ctx: DecisionContext,
        up: Upstream,
        request: httpx.Request,
        own: bool,
        observer: AttemptObserver | None,
        now: float,
        local: Local,
        taken: Any,
    ) -> httpx.Response:
        """The shortcut's call from where it stopped: `first_attempt` on."""
        first = first_attempt(ctx, up, request, own, observer, now, local, taken)
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException as exc:
            return await self._drive(first.resume(None, exc), ctx.engine)
        return first.finish(response) or await self._drive(first.resume(response, None), ctx.engine)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        """Any call: its first attempt by `First` when it makes it, else the loop."""
        started = self._start(request, True)
        if isinstance(started, First):
            try:
                response = await self.inner.handle_async_request(request)
            except BaseException as exc:
                return await self._drive(started.resume(None, exc), started.ctx.engine)
            return started.finish(response) or await self._drive(
                started.resume(response, None), started.ctx.engine
            )
        steps, engine, hedged = started
        if hedged is None:
            return await self._drive(steps, engine)
        race, hedge, spawn, up, ctx, ends = hedged
        # The flags its loops' give-ups set are held until the race is over: a good answer
        # (a hedge's, mostly) ends the call, and a give-up of the first attempt's loop
        # before it says nothing about this call any more (its record stays), so the
        # caller's own 5xx is not marked exhausted for it. (Held, not set back to what they
        # were: another call of the request may mark them meanwhile.)
        held, token = hold_flags(ctx)
        good = False
        try:
            response = await run_race(
                race,
                engine.clock,
                hedge.max_hedges,
                ctx.deadline_at,
                up.retry_statuses,
                lambda: self._drive(steps, engine),
                lambda: self._drive(spawn(), engine),
            )
            status = response.status_code
            good = status < 500 and status not in up.retry_statuses
        finally:
            release_flags(held, token, not good)
            if ends is not None:
                call_end(ends, ctx)
        if ctx is not _CURRENT.get():  # a call of its own (outside a request, or after it)
            response.extensions[CONTEXT_EXTENSION] = ctx
        return response

    async def _drive(self, steps: Steps, engine: Engine) -> httpx.Response:
        """Run one attempt loop to its end, doing its effects."""
        store = engine.store
        inner = self.inner
        value: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                effect = steps.send(value) if thrown is None else steps.throw(thrown)
            except StopIteration as done:
                response: httpx.Response = done.value
                return response
            thrown = None
            kind = effect[0]
            try:
                if kind == SEND:
                    value = await inner.handle_async_request(effect[1])
                elif kind == GATE:  # a remote store (an in-process one is called directly)
                    # Its answer is read whatever happens to the caller meanwhile (the
                    # store's timeout bounds the wait): a call cancelled while the gate
                    # was in flight gives back what the gate took, which the loop, never
                    # seeing the answer, cannot (a retry spent, a probe slot). A raw
                    # `task.cancel()` goes through the shield: the store reads the reply
                    # then, and hands it over on the cancellation (`LATE_ANSWER`).
                    late: Any = None
                    # (Any: compiled, the declared tuple result would be unboxed and boxed
                    # again as a plain tuple, losing a `GateAnswer`'s why and spent_at)
                    gate_op: Any = store.outbound_gate  # (read here: in-process, never)
                    with anyio.CancelScope(shield=True):
                        try:
                            value = await gate_op(*effect[1:])
                        except BaseException as exc:
                            if getattr(exc, LATE_ANSWER, None) is None:
                                raise
                            late = exc
                    if late is not None:  # (given back outside the handler, as below)
                        # (a task of its own, `_whole`: a second raw cancel leaves it running)
                        with anyio.CancelScope(shield=True):
                            await _whole(_give_back(store, effect, getattr(late, LATE_ANSWER)))
                        raise late
                    gone: BaseException | None = None
                    try:
                        await anyio.lowlevel.checkpoint_if_cancelled()
                    except BaseException as exc:  # cancelled: the loop will not go on
                        gone = exc
                    if gone is not None:
                        with anyio.CancelScope(shield=True):
                            await _whole(_give_back(store, effect, value))
                        raise gone
                elif kind == RECORD:
                    if effect[4] == IGNORED or effect[3].probe_id:
                        # A gate given back (cancelled, mostly), or a probe's outcome (it
                        # closes or reopens the breaker, and frees its slot): recorded
                        # under a cancelled scope too (a hedge's loser, a caller gone),
                        # and through a raw `task.cancel()` (`_whole`).
                        with anyio.CancelScope(shield=True):
                            value = await _whole(store.record(*effect[1:]))
                    else:
                        value = await store.record(*effect[1:])
                elif kind == SLEEP:
                    value = None
                    if effect[2] is not None:
                        await _spend(effect[2])
                    await engine.clock.sleep(effect[1])
                elif kind == CLOSE:
                    value = None
                    if len(effect) > 2 and effect[2]:  # (refused: read short, then closed)
                        await _spend(effect[1])
                    else:
                        with anyio.CancelScope(shield=True):  # a cancelled loser closes too
                            await effect[1].aclose()
                elif kind == REFUND:  # a retry not sent (cancelled, mostly): shielded too
                    value = None
                    with anyio.CancelScope(shield=True):
                        await _whole(store.budget_refund(*effect[1:]))
                elif kind == READ:  # a short shed, kept while the call waits with it
                    value = None
                    await effect[1].aread()
                elif kind == WAIT:  # a hedged call's retry, for its hedge's answer
                    value = None
                    await effect[1].settled()
                elif kind == PARK:  # a retry may wait for evidence (`loop._parked`)
                    value = True
            except BaseException as exc:
                thrown = exc

    async def aclose(self) -> None:
        self._shut_bodies()  # (first: the bodies the pool's close cuts say nothing)
        await self.inner.aclose()


async def _spend(response: httpx.Response) -> None:
    """Close a failed attempt's answer before the backoff, read to its end first when it
    is short (`wire.worth_reading`: its connection then goes back to the pool), within
    `SPEND_MAX_S`. A cancellation stops the reading, not the closing. (No `finally`:
    compiled, one run while the caller handles an exception, the first attempt's, raised
    that exception again once it was done.)"""
    gone: BaseException | None = None
    try:
        stream = response.stream
        if (
            worth_reading(response)
            and unread(response)
            and isinstance(stream, httpx.AsyncByteStream)
        ):
            start = _monotonic()
            read = 0
            async for chunk in stream:
                read += len(chunk)
                if read > SPEND_MAX_BYTES or _monotonic() - start > _wire.SPEND_MAX_S:
                    break
    except Exception:  # (a broken connection is closed enough: the retry goes on)
        pass
    except BaseException as exc:  # cancelled: closed all the same, then it goes on
        gone = exc
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await response.aclose()
    if gone is not None:
        raise gone


# Store calls a raw `task.cancel()` left running (`_whole`): held until they end.
_LEFT: Final[set[asyncio.Task[Any]]] = set()


def _left_done(task: asyncio.Task[Any]) -> None:
    _LEFT.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.debug("fidelity_mw: a cancelled call's record failed: %s", task.exception())


async def _whole(call: Coroutine[Any, Any, Any]) -> Any:
    """Await a store call that must reach the store whole (a probe's outcome, a gate or
    a retry given back) even when the caller is cancelled by a raw `task.cancel()`
    (`asyncio.timeout`, `wait_for`), which goes through an anyio shield: run as a task
    of its own, which the cancellation leaves running (a coalesced record is not sent
    at all once its caller is gone: the probe slot stayed leased, the half-open breaker
    refused every call for the probe lease)."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _LEFT.add(task)
            task.add_done_callback(_left_done)
        raise


async def _give_back(store: StateStore, effect: tuple[Any, ...], answer: Any) -> None:
    """A gate answered for a call cancelled meanwhile (`_drive`): give back what it took,
    as the loop gives back a gate whose attempt is not made (an `ignored` outcome frees a
    probe slot) and a retry the budget counted (`budget_refund`, at the store's own time
    of the spend when its answer says it). Best effort: the probe lease and the budget
    window bound what is not given back. Run through `_whole`, so a second raw
    `task.cancel()` while it awaits the store does not stop it half-way."""
    _, breaker_key, breaker, budget_key, cfg, retry, now = effect
    try:
        gate, allowed, source, _age = answer
        taken = gate is None or gate.verdict != "reject"
        if gate is not None and breaker is not None and taken:
            await store.record(breaker_key, breaker, gate, IGNORED, False, now)
        refund = getattr(store, "budget_refund", None)
        if retry and allowed and taken and budget_key is not None and refund is not None:
            spent_at = getattr(answer, "spent_at", None)
            if spent_at is None:
                await refund(budget_key, cfg, source, 0.0, now)
            else:
                await refund(budget_key, cfg, source, 0.0, now, spent_at)
    except Exception as exc:
        logger.debug("fidelity_mw: a cancelled call's gate not given back: %s", exc)


# ---------------------------------------------------------------- sync


def _sync_ops(
    store: StateStore,
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """`outbound_gate`, `record` and `budget_refund` callable from sync code.

    (An in-process store is called by the loop directly.) A remote store's own
    blocking client (`outbound_gate_sync` / `record_sync`: Redis, any thread);
    else its coroutines run on the event loop of the anyio worker thread we are
    in (sync FastAPI / Starlette routes run there).
    """
    gate = getattr(store, "outbound_gate_sync", None)
    record = getattr(store, "record_sync", None)
    refund = getattr(store, "budget_refund_sync", None)
    if refund is None:  # (a store of its own that gives nothing back: nothing to do)
        give_back = getattr(store, "budget_refund", None)
        refund = _ignore if give_back is None else _bridge(give_back)
    if gate is not None and record is not None:
        return gate, record, refund

    return _bridge(store.outbound_gate), _bridge(store.record), refund


def _ignore(*args: Any) -> None:
    return None


def _bridge(method: Callable[..., Any]) -> Callable[..., Any]:
    """An async store method run on the event loop of the anyio worker thread we are in."""

    def bridged(*args: Any) -> Any:
        import anyio.from_thread

        return anyio.from_thread.run(method, *args)

    return bridged


def _spend_sync(response: httpx.Response) -> None:
    """`_spend` for the sync transport."""
    gone: BaseException | None = None
    try:
        stream = response.stream
        if (
            worth_reading(response)
            and unread(response)
            and isinstance(stream, httpx.SyncByteStream)
        ):
            start = _monotonic()
            read = 0
            for chunk in stream:
                read += len(chunk)
                if read > SPEND_MAX_BYTES or _monotonic() - start > _wire.SPEND_MAX_S:
                    break
    except Exception:  # (a broken connection is closed enough: the retry goes on)
        pass
    except BaseException as exc:  # interrupted: closed all the same, then it goes on
        gone = exc
    with contextlib.suppress(Exception):
        response.close()
    if gone is not None:
        raise gone


def _close_sync(response: httpx.Response, spend: bool = False) -> None:
    """The CLOSE effect: a response we will not hand back (read short first with `spend`)."""
    if spend:
        _spend_sync(response)
    else:
        response.close()


def _no_park() -> bool:
    """The PARK effect, sync: no retry waits for evidence (`loop._parked`) on a thread. A
    sync client's thread is a server's worker more often than not (a sync route's, from
    a pool every sync route shares): in an outage every call would hold one for up to
    the callee's Retry-After, for evidence that comes only at its end, if at all."""
    return False


def _waiter(sleep: Callable[[float], None]) -> Callable[[float, httpx.Response | None], None]:
    """A backoff sleep that first closes the response it spends (module level, as
    `_spawner`)."""

    def wait(seconds: float, spent: httpx.Response | None) -> None:
        if spent is not None:
            _spend_sync(spent)
        sleep(seconds)

    return wait


@mypyc_attr(native_class=False)  # the engine holds transports weakly
class FidelitySyncTransport(_Base, httpx.BaseTransport):
    """The same layer for `httpx.Client`: sync code, including sync FastAPI routes
    (the request's context variables reach the worker thread). Backoff sleeps
    block the calling thread through `clock.sleep_sync`."""

    inner: httpx.BaseTransport

    @staticmethod
    def _default_inner() -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    @staticmethod
    def _wrong_inner(inner: Any) -> str | None:
        if hasattr(inner, "handle_request"):
            return None
        return (
            f"FidelitySyncTransport's inner transport must be sync (an httpx.BaseTransport "
            f"such as httpx.HTTPTransport()); got {type(inner).__name__}. For "
            f"httpx.AsyncClient and an async inner transport use FidelityTransport"
        )

    # httpx.AsyncClient calls these on its transport (see FidelityTransport's pair)
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise TypeError(_SYNC_IN_ASYNC_CLIENT)

    async def __aenter__(self) -> FidelitySyncTransport:
        raise TypeError(_SYNC_IN_ASYNC_CLIENT)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ctx = _current.get()
        lock: contextlib.AbstractContextManager[Any]
        if ctx is not None and not ctx.response_complete:
            # The request's context: other threads may share it (`_sync_lock`). Its
            # records are made with the lock held, the effects (the send, a backoff's
            # sleep, a store's round trip, a body's read) without it.
            lock = ctx._sync_lock or _sync_lock_of(ctx)
            with lock:
                started = self._start(request)
        else:  # a call of its own (`_start` makes its context): nobody else records there
            lock = _UNSHARED
            started = self._start(request)
        if isinstance(started, First):
            try:
                response = self.inner.handle_request(request)
            except BaseException as exc:
                return self._run(started.resume(None, exc), started.ctx.engine, lock)
            with lock:
                done = started.finish(response)
            return done or self._run(started.resume(response, None), started.ctx.engine, lock)
        steps, engine, _ = started
        return self._run(steps, engine, lock)

    def _run(
        self, steps: Steps, engine: Engine, lock: contextlib.AbstractContextManager[Any]
    ) -> httpx.Response:
        """Run one attempt loop to its end, doing its effects (`lock` held while the
        loop records between them)."""
        step = _Stepper(steps)
        gate_op, record_op, refund_op = _sync_ops(engine.store)
        wait = _waiter(engine.clock.sleep_sync)
        do: dict[int, Callable[..., Any]] = {
            SEND: self.inner.handle_request,
            GATE: gate_op,
            RECORD: record_op,
            SLEEP: wait,
            CLOSE: _close_sync,
            REFUND: refund_op,
            READ: httpx.Response.read,
            PARK: _no_park,
        }
        while True:
            with lock:
                effect = step.next()
            if effect is None:
                return step.result
            try:
                step.value = do[effect[0]](*effect[1:])
            except BaseException as exc:
                step.thrown = exc

    def close(self) -> None:
        self._shut_bodies()
        self.inner.close()


# A context no other thread records in: its call's own (no lock needed).
_UNSHARED: Final = contextlib.nullcontext()
# Makes each context's `_sync_lock` once, when two threads ask at the same moment.
_SYNC_LOCKS: Final = threading.Lock()


def _sync_lock_of(ctx: DecisionContext) -> threading.RLock:
    """The context's lock for blocking calls (reentrant: an observer's or a hook's
    own call through the transport, in the same thread, takes it again)."""
    with _SYNC_LOCKS:
        lock = ctx._sync_lock
        if lock is None:
            lock = ctx._sync_lock = threading.RLock()
        return lock
