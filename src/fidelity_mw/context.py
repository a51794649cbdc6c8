"""The per-request decision context and the decision records layers append to it."""

from __future__ import annotations

import itertools
import operator
import os
import threading
from collections import Counter
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import FunctionType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from .state import base as _state_base

if TYPE_CHECKING:
    from .engine import Engine

# Layers, verdicts and state sources are plain strings (cheap to compare and to
# export as attributes); these constants are the vocabulary.
LAYER_DEADLINE: Final = "deadline"
LAYER_BREAKER: Final = "breaker"
LAYER_RATELIMIT: Final = "ratelimit"
LAYER_RETRY: Final = "retry"
LAYER_BUDGET: Final = "budget"
LAYER_LB: Final = "lb"  # which instance of a service an attempt goes to
LAYER_CONCURRENCY: Final = "concurrency"
# what decided a refusal for want of the control state (a layer's state could not be
# read and `state.on_error = "closed"`): no breaker was open, no limit exhausted
LAYER_STATE: Final = "state"

ALLOW: Final = "allow"
REJECT: Final = "reject"
SHED: Final = "shed"
PROBE: Final = "probe"
RETRY: Final = "retry"
GIVE_UP: Final = "give_up"
QUEUED: Final = "queued"  # waited for a concurrency slot, then admitted
WOULD_REJECT: Final = "would_reject"  # shadow mode: recorded, not enforced

SOURCE_MEMORY: Final = "memory"
SOURCE_REDIS: Final = "redis"
SOURCE_CACHE: Final = "cache"
SOURCE_FALLBACK: Final = "fallback"
SOURCE_REQUEST: Final = "request"  # decided on the request itself (headers), no stored state

# On an outbound request's extensions while its attempt starts (`AttemptObserver.
# attempt_start`), set by the retry loop: the attempt's own decisions, the retry layer's
# (its `attempt`, `retry` or `hedge`) first, then any it took after that one's wait (a
# probe taken again). Calls made together in one request share its record, so the run of
# decisions that led to an attempt is found from there, not from the record's end.
ATTEMPT_DECISIONS: Final = "fidelity_mw.attempt_decisions"

DetailValue = str | int | float | bool


class Decision(NamedTuple):
    """One layer's decision. Immutable and cheap: a tuple with names."""

    layer: str
    subject: str
    verdict: str
    reason: str
    state_source: str = SOURCE_MEMORY
    state_age_s: float = 0.0
    at: float = 0.0
    details: Mapping[str, DetailValue] | None = None

    @property
    def is_stale(self) -> bool:
        """Decided on anything but a fresh read of the authoritative state."""
        return self.state_source in (SOURCE_CACHE, SOURCE_FALLBACK) or self.state_age_s > 1.0


# Bounds on the records one context holds. A request keeps its records until its response
# completes, and each outbound call made inside it adds one (more when it retries): a
# stream that polls an upstream, or a job of 2,000 calls, held 2,000 records (321 KB) and
# more without end. Past `MAX_DECISIONS` records the context makes room (`_make_room`):
# it keeps the first `KEEP_HEAD` (the request's own decisions come first: deadline,
# bulkhead, breaker, limits), the latest `KEEP_TAIL` (the call under way reads its run of
# records, and code reads `decisions[-1]`), and between them the first `MAX_FLAGGED`
# decisions other than `allow` (the failures an operator looks for); the rest are
# counted by layer, verdict, reason and source (`dropped_counts`), so the request's
# summary and counters stay exact. 256 records are about 40 KB; a request of a few
# dozen calls never gets there (docs/telemetry.md, "Long requests").
MAX_DECISIONS: Final = 256
KEEP_HEAD: Final = 16
KEEP_TAIL: Final = 16
MAX_FLAGGED: Final = 128
# distinct (layer, subject, verdict, reason, source) counted among the dropped: past it a
# subject (an upstream host, a limit's name) folds into `_other`
_MAX_DROPPED_KINDS: Final = 256
_MAX_BREAKER_NOTES: Final = 64  # DecisionContext.note_breaker
_OTHER: Final = "_other"
_STALE_SOURCES: Final = (SOURCE_CACHE, SOURCE_FALLBACK)
# layers whose dropped records keep their subject: a rate limit's name is part of the
# summary's entry, and the retry budget's counters are per upstream
_SUBJECT_LAYERS: Final = frozenset({LAYER_RATELIMIT, LAYER_RETRY, LAYER_BUDGET})

# (layer, subject: "" but for _SUBJECT_LAYERS, verdict, reason, source)
DroppedKey = tuple[str, str, str, str, str]
# A record's verdict, and its fields a dropped record is counted by (with its age, which
# says whether it was stale): read in C over a run of records (`_make_room`). A record is
# a tuple subclass, whose subscripts CPython 3.11 does not specialise: read one by one
# in Python they cost ~60 bytecodes a record, ~2k machine instructions.
_verdict_of: Final = operator.itemgetter(2)
_kind_of: Final = operator.itemgetter(0, 1, 2, 3, 4, 5)


_PID: Final = os.getpid()
_SEQUENCE: Final = itertools.count(1)
_next_seq: Final = _SEQUENCE.__next__  # one C call per request (compiled: no `next` lookup)


class DecisionContext:
    """Everything the layers know about one request, and what they decided.

    One per inbound request (and one per outbound call made outside a
    request). Reachable through `fidelity_mw.current()`, `scope["state"]
    ["fidelity"]` (Starlette: `request.state.fidelity`) and, from the httpx
    transport, the same ContextVar.

    Attributes that most requests never set are class-level defaults, so
    creating a context costs only what every request needs.
    """

    deadline_at: float | None = None
    client_key: str | None = None
    decided_by: str | None = None
    outcome: str | None = None
    status: int | None = None
    client_disconnected = False
    # Set by the transport when it gave up retrying an upstream; the
    # middleware then tells our own callers not to retry us.
    upstream_exhausted = False
    # Set by the transport when a call of this request ended on a failure its upstream's
    # breaker counted (a 5xx, an error, a body that broke): the middleware marks our own
    # 5xx `x-fidelity-fault: upstream`, so our callers' breakers leave that fault to the
    # breaker next to it (ours for that upstream) and do not open on us for it.
    upstream_failed = False
    # Set by the transport when it gave up on an upstream's 429 after retrying (and by
    # the middleware when the app let that 429 out, answered 503 `upstream-throttled`): the
    # app's gateway answer for it is no breaker's failure (an upstream's 429 never is),
    # the route breaker's neither.
    upstream_throttled = False
    # Set by the transport when a control layer (host breaker, deadline) refused an
    # outbound call before anything was sent, or by a per-route form that turned the
    # request away inside the app (FastAPI `Depends(limit)`): an error response then
    # is that layer's decision, not the route's failure, and costs the client no
    # quota of the middleware's own limits.
    shed_by: str | None = None
    # Set by the transport when it refused a call to an upstream the client chose (an
    # `[[upstream]]` entry with `client_chosen`) before sending it: with the attempts
    # (`attempts`), what says the request called one (inbound/refusals.charged_for_upstream).
    refused_client_chosen = False
    # The response's last message went out: the caller has its answer, and work after
    # it (a background task) runs for nobody who waits, so outbound calls then are
    # calls of their own, not bound by this request's deadline.
    response_complete = False
    inbound_attempt = 1
    trusted_peer = False
    deadline_from_caller = False  # the deadline came from a request header
    # When the last response message was sent (monotonic): the end of the call for
    # slow-call accounting, before any background task runs. None until then.
    ended_at: float | None = None
    # How long the app waited on its client (its body to come in before the response
    # started, a body message of the response to be taken): the client's time, not the
    # route's, so not in a slow call or an adaptive limit's latency sample (a few slow
    # connections would open the breaker or shrink the limit for every client). Counted
    # on routes that measure latency only (inbound/watch.ClientReceive).
    client_wait_s = 0.0
    # Headers the middleware adds to the app's response (RateLimit fields).
    response_headers: list[tuple[bytes, bytes]] | None = None
    # Decisions known as facts but not yet built into records (see `decisions`).
    _pending: tuple[Any, ...] | None = None
    # The facts `_pending` held once they were built into records: the middleware's
    # RateLimit fields are redone from them when another layer refuses the request
    # (its units come back: inbound/xratelimit.refunded_fields).
    _built: tuple[Any, ...] | None = None
    _attempts: dict[str, int] | None = None
    # The token that undoes the middleware's making of this context current: the
    # response's last message goes out after a reset with it (no mapping of the variable
    # for the server's keep-alive timer to keep), and the token of setting the context
    # anew replaces it (inbound/watch.ResponseWatcher); the middleware resets with it.
    _token: Token[DecisionContext | None] | None = None
    # Held by the blocking transport while a call's attempt loop runs between its effects
    # (`FidelitySyncTransport`): threads sharing this context (a sync route's worker
    # fanning out with `copy_context`) interleaved their records, so a CLIENT span took
    # another call's pick, and lost counts of `attempts`. Made on first use.
    _sync_lock: threading.RLock | None = None
    # Records dropped to keep the context bounded (`_make_room`): how many, and per kind
    # [count, of which stale]. None / 0 until a request gets that long.
    _dropped: dict[DroppedKey, list[int]] | None = None
    dropped_total = 0
    # Records before this index are never dropped: telemetry exported them by index
    # (`before_response_end`), and its later events start there.
    _sealed = 0
    _room_at = MAX_DECISIONS  # the length at which room is made
    # What a shared store answered to an outcome that moved a breaker (a probe's success
    # that closed it, a failure that opened it), which no decision says: (the record
    # it followed, subject, "route" | "upstream", state afterwards). The breaker gauge
    # reads it in its place among the decisions (`note_breaker`). None until one.
    _breakers_after: list[tuple[Decision | None, str, str, str]] | None = None

    def __init__(
        self,
        engine: Engine,
        route: str,
        method: str,
        started_at: float,
        deadline_at: float | None = None,
        client_key: str | None = None,
    ) -> None:
        self._seq = _next_seq()
        self.engine = engine
        self.route = route
        self.method = method
        self.started_at = started_at
        if deadline_at is not None:
            self.deadline_at = deadline_at
        if client_key is not None:
            self.client_key = client_key
        self._decisions: list[Decision] = []
        self.shed_by = None  # (read on every request: see new_request_context)
        self.response_headers = None
        # Read by every outbound call made inside the request (and `_room_at` by every
        # `decisions` read), so the instance's own: as `new_request_context` says, a read
        # that falls through to the class default is not specialized interpreted.
        self.response_complete = False
        self._pending = None
        self._room_at = MAX_DECISIONS

    @property
    def decisions(self) -> list[Decision]:
        """The decisions so far, in order.

        On the hot path a layer may leave `(builder, *facts)` in `_pending`
        instead of building records nobody may read; they are built here, on
        first access, before anything else is appended.
        """
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._built = pending
            pending[0](self, *pending[1:])
        records = self._decisions
        if len(records) >= self._room_at:
            self._make_room(records)
        return records

    def _make_room(self, records: list[Decision]) -> None:
        """Drop records between the kept head and tail (see `MAX_DECISIONS`), in place:
        every `allow` one, and the decisions other than `allow` past the first
        `MAX_FLAGGED`; count each dropped one by its kind."""
        lo = KEEP_HEAD if self._sealed < KEEP_HEAD else self._sealed
        hi = len(records) - KEEP_TAIL
        if hi <= lo:
            return  # (sealed near the end: nothing may go yet)
        head = list(map(_verdict_of, records[KEEP_HEAD:lo]))
        flagged = len(head) - head.count(ALLOW)
        dropped = self._dropped
        if dropped is None:
            dropped = self._dropped = {}
        verdicts = list(map(_verdict_of, records[lo:hi]))
        if flagged >= MAX_FLAGGED or verdicts.count(ALLOW) == len(verdicts):
            # Every record between head and tail goes (the common case: a long run of
            # attempts allowed): counted by kind in C first, then each kind once.
            try:
                kinds = Counter(map(_kind_of, records[lo:hi]))
            except TypeError:  # (a field that does not hash: one by one, below)
                pass
            else:
                self._count_dropped(dropped, kinds)
                del records[lo:hi]  # in place: a caller may hold the list (or its append)
                self.dropped_total += hi - lo
                return
        kept: list[Decision] = []
        n = 0
        for d in records[lo:hi]:
            verdict = d[2]
            if verdict != ALLOW and flagged < MAX_FLAGGED:
                flagged += 1
                kept.append(d)
                continue
            layer = d[0]
            key = (layer, d[1] if layer in _SUBJECT_LAYERS else "", verdict, d[3], d[4])
            counts = dropped.get(key)
            if counts is None:
                if len(dropped) >= _MAX_DROPPED_KINDS:
                    key = (layer, _OTHER, verdict, d[3], d[4])
                    counts = dropped.get(key)
                if counts is None:
                    counts = dropped[key] = [0, 0]
            counts[0] += 1
            if d[4] in _STALE_SOURCES or d[5] > 1.0:  # (Decision.is_stale, without a call)
                counts[1] += 1
            n += 1
        records[lo:hi] = kept  # in place: a caller may hold the list (or its append)
        self.dropped_total += n

    @staticmethod
    def _count_dropped(
        dropped: dict[DroppedKey, list[int]], kinds: Counter[tuple[Any, ...]]
    ) -> None:
        """`_make_room`'s count of dropped records, a kind (and its number) at a time: the
        same counts as one record at a time, a kind's key placed (or folded into
        `_OTHER`) at its first record, as there (a Counter keeps first-seen order)."""
        for (layer, subject, verdict, reason, source, age), m in kinds.items():
            key = (layer, subject if layer in _SUBJECT_LAYERS else "", verdict, reason, source)
            counts = dropped.get(key)
            if counts is None:
                if len(dropped) >= _MAX_DROPPED_KINDS:
                    key = (layer, _OTHER, verdict, reason, source)
                    counts = dropped.get(key)
                if counts is None:
                    counts = dropped[key] = [0, 0]
            counts[0] += m
            if source in _STALE_SOURCES or age > 1.0:
                counts[1] += m

    def seal(self, exported: int) -> None:
        """Telemetry exported the first `exported` records (by index): they stay where
        they are, and room is made after them."""
        self._sealed = exported
        self._room_at = exported + MAX_DECISIONS

    @property
    def dropped_counts(self) -> dict[DroppedKey, int]:
        """The records dropped to keep this context bounded, counted by (layer, subject,
        verdict, reason, source); subject is "" but for rate limits, retries and budgets."""
        dropped = self._dropped
        return {} if dropped is None else {key: n for key, (n, _) in dropped.items()}

    @property
    def attempts(self) -> dict[str, int]:
        """Outbound attempts made while handling this request, per upstream host."""
        if self._attempts is None:
            self._attempts = {}
        return self._attempts

    @property
    def request_id(self) -> str:
        """Process-unique id, built on demand (formatting it per request is not free)."""
        return f"{_PID:x}-{self._seq:x}"

    @property
    def policy_version(self) -> str:
        return self.engine.policy.version

    def remaining_s(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (negative once past), or None without one.

        `now` defaults to the middleware's clock (the `clock=` it was given, else
        `time.monotonic`): a handler need not know which clock that is."""
        deadline_at = self.deadline_at
        if deadline_at is None:
            return None
        if now is None:
            now = self.engine.clock.monotonic()
        return deadline_at - now

    def add(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def note_breaker(self, subject: str, scope: str, state: str) -> None:
        """A shared store said breaker `subject` (of `scope`, "route" or "upstream") is
        `state` after an outcome this request reported: after the records so far, for
        the gauge (telemetry reads decisions; no decision says this)."""
        records = self.decisions
        after = records[-1] if records else None
        notes = self._breakers_after
        if notes is None:
            notes = self._breakers_after = []
        elif len(notes) >= _MAX_BREAKER_NOTES:  # a long request: the latest count
            del notes[: _MAX_BREAKER_NOTES // 2]
        notes.append((after, subject, scope, state))

    def decide(
        self,
        layer: str,
        subject: str,
        verdict: str,
        reason: str,
        *,
        source: str = SOURCE_MEMORY,
        age_s: float = 0.0,
        at: float = 0.0,
        details: Mapping[str, DetailValue] | None = None,
    ) -> Decision:
        decision = Decision(layer, subject, verdict, reason, source, age_s, at, details)
        self.decisions.append(decision)
        return decision

    @property
    def stale_decisions(self) -> int:
        stale = sum(1 for d in self.decisions if d.is_stale)
        if self._dropped is not None:
            stale += sum(counts[1] for counts in self._dropped.values())
        return stale

    def last(self, layer: str) -> Decision | None:
        for decision in reversed(self.decisions):
            if decision.layer == layer:
                return decision
        return None

    def __repr__(self) -> str:
        return (
            f"<DecisionContext {self.request_id} {self.method} {self.route} "
            f"outcome={self.outcome} decided_by={self.decided_by} "
            f"decisions={len(self.decisions)}>"
        )


_object_new: Final = object.__new__


def new_request_context(
    engine: Engine, route: str, method: str, started_at: float
) -> DecisionContext:
    """`DecisionContext(engine, route, method, started_at)`, the same fields set, without
    the class call: interpreted, calling a class whose `__init__` is Python code costs an
    interpreter call of its own (type.__call__, slot_tp_init) on top of the function's.
    Only where this module runs interpreted (`INTERPRETED`): a compiled class refuses
    `object.__new__`, and its native constructor is the cheap way there."""
    ctx: DecisionContext = _object_new(DecisionContext)
    ctx._seq = _next_seq()
    ctx.engine = engine
    ctx.route = route
    ctx.method = method
    ctx.started_at = started_at
    ctx._decisions = []
    # Read on every request (the response start, the outcome): given a value here, for
    # a read that falls through to the class default is not specialized interpreted
    # (about 200 instructions against 15 for this store).
    ctx.shed_by = None
    ctx.response_headers = None
    ctx.response_complete = False  # (and these read by every outbound call in the request)
    ctx._pending = None
    ctx._room_at = MAX_DECISIONS
    return ctx


# This module runs as Python source (not compiled by mypyc): see new_request_context.
INTERPRETED: Final = type(new_request_context) is FunctionType


def inline_fields(cls: type, names: tuple[str, ...]) -> None:
    """Make room for `names` in the attribute table `cls`'s instances share, before any
    instance is made.

    CPython 3.11 keeps an instance's attributes without a dict of their own only for the
    names in a table its class shares, and that table takes new names only while the class
    is young: each new instance shrinks its room, and after about 30 instances it takes one
    more name and then none. An attribute first set later (on a path the process's first
    requests did not take: a caller's deadline header, a refusal, a 500) gives every
    instance that sets it a dict of its own, for the life of the process: +3.5k to +3.7k
    machine instructions on each such request (benchmarks/features.py; a request of the
    full default stack is ~147k). Set once here, at import, every name is in the table
    from the first request on. The table holds 29 names besides this instance's own room:
    leave the rarest out when there are more. A compiled (native) class has no such table:
    nothing to do."""
    try:
        instance: object = object.__new__(cls)
    except TypeError:  # a native class refuses object.__new__
        return
    for name in names:
        object.__setattr__(instance, name, None)


# Every attribute a request's path may set, but four no common path sets (`_dropped` and
# `dropped_total`: a request past `MAX_DECISIONS` records; `refused_client_chosen`;
# `_breakers_after`: an outcome that moved a breaker on a shared store): the table's 29
# names.
CONTEXT_FIELDS: Final = (
    *("_seq", "engine", "route", "method", "started_at", "_decisions", "shed_by"),
    *("response_headers", "response_complete", "_pending", "_room_at", "_token", "status"),
    *("deadline_at", "deadline_from_caller", "client_key", "trusted_peer", "inbound_attempt"),
    *("decided_by", "outcome", "client_disconnected", "ended_at", "client_wait_s", "_built"),
    *("_attempts", "upstream_exhausted", "upstream_failed", "upstream_throttled", "_sealed"),
)
if INTERPRETED:
    inline_fields(DecisionContext, CONTEXT_FIELDS)

_CURRENT: Final[ContextVar[DecisionContext | None]] = ContextVar(
    "fidelity_mw_context", default=None
)


def current() -> DecisionContext | None:
    """The DecisionContext of the request being handled, or None outside one."""
    return _CURRENT.get()


def _request_deadline() -> float | None:
    """`state.base.request_deadline`: the deadline of the request being handled."""
    ctx = _CURRENT.get()
    return None if ctx is None else ctx.deadline_at


# (the state layer imports nothing above it: it is told how to read the request's deadline)
_state_base.request_deadline = _request_deadline


def context_from_scope(scope: Mapping[str, Any]) -> DecisionContext | None:
    state = scope.get("state")
    if isinstance(state, Mapping):
        ctx = state.get("fidelity")
        if isinstance(ctx, DecisionContext):
            return ctx
    return None
