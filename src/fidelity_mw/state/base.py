"""The contract every state store keeps: atomic decisions that report their provenance."""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from typing import Final

from ..decide.breaker import Gate
from ..decide.fleet import FleetShare
from ..decide.specs import LimitSpec as LimitSpec
from ..policy import BreakerConfig, RetryConfig
from .local import InboundResult as InboundResult  # (compiled there: a native class)
from .snapshot import SnapshotConfigs, StoreSnapshot

# Between a breaker's key and the id of the process that owns it (`breaker.scope =
# "process"`): no character of a host (a route's name or path may hold one: `fleet_key`).
OWN_BREAKER_MARK: Final = "@"


def breaker_home(key: str, breaker: BreakerConfig | None, store: object) -> str:
    """The key a breaker is kept under in `store`: `key`, or with `scope = "process"` on
    a shared store (one that has a `process_id`), `key` + "@" + that id, so each process
    counts and opens its own breaker there. Memory stores keep every breaker per process
    already, under its plain key."""
    if breaker is None or breaker.scope != "process":
        return key
    own = getattr(store, "process_id", None)
    return key if own is None else f"{key}{OWN_BREAKER_MARK}{own}"


# A process's own breaker key's end: "@" and its fleet member id (`FleetMember.id`, 16
# hex digits). Matched whole: a route name or path may hold an "@" of its own (`/@{user}`).
_OWNED: Final = re.compile(r"(.+)@[0-9a-f]{16}")


def fleet_key(key: str) -> str:
    """The breaker key `key` is a process's own of (`breaker_home`), or `key` itself:
    what the policy names it by (the admin page finds its config so)."""
    owned = _OWNED.fullmatch(key)
    return key if owned is None else owned.group(1)


def _no_request() -> float | None:
    return None


# The deadline (`DecisionContext.deadline_at`, on the engine's clock) of the request being
# handled: None outside one, or without one. A shared store waits for its state no longer
# than that (`RedisStore._wait_s`). The package sets it (`fidelity_mw/__init__.py`) to read
# `fidelity_mw.context.current()`: the state layer imports nothing above it.
request_deadline: Callable[[], float | None] = _no_request


class GateAnswer(tuple[Gate | None, bool, str, float]):
    """An `outbound_gate` answer of a shared store that says more than the four values
    (gate, allowed, source, age_s): `why` a fallback answer was decided without the
    shared state, as `InboundResult.why` says it ("unreachable", "read_only", "error"),
    for the outbound decisions taken on it; `spent_at`, the state's own time (Redis:
    the server's) at which a retry was spent, for `budget_refund`."""

    why: str | None
    spent_at: float | None

    def __new__(
        cls,
        values: tuple[Gate | None, bool, str, float],
        why: str | None = None,
        spent_at: float | None = None,
    ) -> GateAnswer:
        self = super().__new__(cls, values)
        self.why = why
        self.spent_at = spent_at
        return self


# The `outbound_gate` answer of a call cancelled by a raw `task.cancel()` while its reply was
# on its way, read all the same by a remote store and set on the `CancelledError` under this
# name: the caller gives back what the gate took (a probe slot, a retry), as it does for a
# call an anyio scope cancelled (whose reply it reads under a shield).
LATE_ANSWER: Final = "fidelity_mw_late_answer"

# None: this request needs the store's I/O after all; await `admit` / `record`.
AdmitNow = Callable[
    [str | None, BreakerConfig | None, Sequence[str], Sequence[LimitSpec], float],
    InboundResult | None,
]
RecordNow = Callable[[str, BreakerConfig, Gate, str, bool, float], str | None]
GateNow = Callable[[str, BreakerConfig, float], Gate]
RefundNow = Callable[[Sequence[str], Sequence[LimitSpec], float, Sequence[float] | None], None]
BudgetRequestNow = Callable[[str, RetryConfig, float], None]
BudgetTryRetryNow = Callable[[str, RetryConfig, float], tuple[bool, str, float]]
OutboundBeginNow = Callable[[str, BreakerConfig | None, str, RetryConfig, float], Gate | None]
BudgetRefundNow = Callable[[str, RetryConfig, float, float], bool]
OutboundGateNow = Callable[
    [str | None, BreakerConfig | None, str | None, RetryConfig | None, bool, float],
    tuple[Gate | None, bool],
]


class StateStore(abc.ABC):
    """Atomic breaker and limiter operations.

    `admit` decides the route breaker and every rate limit of one request in
    one step: limits are committed only if the breaker admits and every
    enforced limit allows (a rejection consumes no quota anywhere), and a
    probe slot taken by the gate is given back when a limit rejects.
    """

    source: str = "memory"

    # The in-process fast path. A store that decides in this process, with no
    # I/O, sets these to methods with the same arguments and results as
    # `admit` / `record`, without the coroutine (MemoryStore does); adapters
    # call them when they are not None instead of awaiting the coroutine.
    # None here means "no in-process fast path": await `admit` / `record`.
    # A store that decides most requests in process but some over I/O (tiered:
    # on leased slices, leasing more from Redis) sets them too, and they answer
    # None, having changed nothing, when that request needs the I/O: the caller
    # then awaits the coroutine. Such a store sets no other `*_now` twin (the
    # transports require `outbound_gate_now` with `record_now`); MemoryStore's
    # never answer None.
    admit_now: AdmitNow | None = None
    record_now: RecordNow | None = None
    # Its sync twins (set together with admit_now): `gate_now` is `breaker_gate`
    # without provenance; `refund_now` is `refund` (the source is this store);
    # `outbound_begin_now` is `budget_request` then, with a breaker, `gate_now`.
    gate_now: GateNow | None = None
    refund_now: RefundNow | None = None
    budget_request_now: BudgetRequestNow | None = None
    budget_try_retry_now: BudgetTryRetryNow | None = None
    outbound_begin_now: OutboundBeginNow | None = None
    outbound_gate_now: OutboundGateNow | None = None  # `outbound_gate` less provenance
    budget_refund_now: BudgetRefundNow | None = None  # `budget_refund` of its own spends

    @abc.abstractmethod
    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult: ...

    @abc.abstractmethod
    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        """Report how an admitted call ended. Returns the breaker state afterwards."""

    @abc.abstractmethod
    async def breaker_gate(
        self, breaker_key: str, breaker: BreakerConfig, now: float
    ) -> tuple[Gate, str, float]:
        """Gate one call on a breaker alone (outbound). Returns (gate, source, age_s)."""

    # ------------------------------------------------------------ outbound retry budget
    #
    # One budget per upstream (key `budget:<host[:port]>`), arithmetic in
    # `fidelity_mw.decide.budget` (`BudgetWindow`, `budget_allows`): over a sliding
    # window of `cfg.budget_window_s`, retries <= cfg.budget_ratio x requests
    # + cfg.budget_min_per_s x cfg.budget_window_s. "Requests" are top-level
    # outbound calls (first attempts), not retries.
    #
    # Sync twins: an in-process store (one with `admit_now`) also offers
    # `budget_request_now`, `budget_try_retry_now`, `gate_now`, `refund_now`
    # and `outbound_begin_now` with the same arguments and results, without
    # the coroutine. The transports use them when present; otherwise they
    # await the async method (the sync transport on an event loop of its own).

    async def budget_request(self, budget_key: str, cfg: RetryConfig, now: float) -> None:
        """Count one top-level outbound request to the upstream of `budget_key`.

        Called once per call, before its first attempt. May be best-effort
        (a remote store may count it asynchronously); must not raise for a
        missing key. The default counts nothing, which leaves only the
        per-second floor: override it.
        """
        return None

    async def budget_try_retry(
        self, budget_key: str, cfg: RetryConfig, now: float
    ) -> tuple[bool, str, float]:
        """Atomically check the budget and, if it allows one more retry, spend it.

        Returns (allowed, source, age_s): `source` is memory | redis | cache |
        fallback and `age_s` how old the counts behind the answer were, as
        for every other store decision. A denied retry spends nothing. The
        default allows every retry (source "fallback"): override it.
        """
        return True, "fallback", 0.0

    async def outbound_gate(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """Everything an outbound attempt needs from the store, in one operation.

        First attempt (`retry=False`): count one request on the budget and gate
        the host breaker. Retry (`retry=True`): spend one retry if the budget
        allows it, then gate the breaker (a denied retry takes no gate).
        Returns (gate or None, budget allowed, source, age_s). Remote stores
        override this to make it one round trip; this default composes the
        separate operations.
        """
        source, age = "memory", 0.0
        if budget_key is not None and cfg is not None:
            if retry:
                allowed, source, age = await self.budget_try_retry(budget_key, cfg, now)
                if not allowed:
                    return None, False, source, age
            else:
                await self.budget_request(budget_key, cfg, now)
        if breaker_key is None or breaker is None:
            return None, True, source, age
        gate, source, age = await self.breaker_gate(breaker_key, breaker, now)
        return gate, True, source, age

    async def budget_refund(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        """Give back one retry that `outbound_gate` spent `age_s` ago (on the caller's
        clock) and whose attempt was then not sent: the call was cancelled during the
        backoff, or the deadline passed before it. It comes off the bucket it was counted
        in, as long as that bucket is still in the window (`BudgetWindow.refund`).
        `spent_at`: when the store said the retry was spent, on its own clock
        (`GateAnswer.spent_at`), passed only when the answer said it: it finds the
        bucket exactly, where an age on another clock can land in the next one.

        `source` is the gate's: a retry spent on a fallback decision goes back to the
        fallback's counts. Best effort (a refund that cannot reach the store is dropped);
        never on the success path. The default gives nothing back.
        """
        return None

    @abc.abstractmethod
    async def refund(
        self,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        source: str,
        now: float,
        admitted_tats: Sequence[float] | None = None,
        *,
        fleet: FleetShare | None = None,
    ) -> None:
        """Give back the units `admit` charged these limits: another control layer shed the
        request after it was admitted (an outbound breaker refused its upstream call).

        `source` is the admission's (a tiered store returns units to where they came
        from). `admitted_tats` are the `LimitVerdict.tat` values of that admission
        (in the store's own clock): units that refilled since are not given back
        twice (`decide.gcra.refund`); without them every unit is given back.
        `fleet` is the admission's `InboundResult.fleet`: a local fallback decision's
        units go back to the bucket that admission charged (this instance's share of
        the fleet, or the whole limit), whatever the share is by the time of the refund.
        Best effort: a refund that cannot reach the store is dropped.
        """

    async def peek(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        """Would a request with these limits be admitted now? Check without counting
        (limits' `test()`): each limit's verdict as `admit` would decide it (retry credit
        included), from the same state, and nothing charged, spent or created.

        The result has no gate; `admitted` says whether every limit that is not shadow
        allows; each verdict's `remaining` and `reset_s` describe the bucket as it is,
        `retry_after_s` when the request would be admitted. A store that cannot reach
        its state answers as `state.on_error` says for admissions (`closed` raises
        `StateUnavailable`). The default says this store cannot check.
        """
        raise NotImplementedError(f"{type(self).__name__} offers no check without counting")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. The memory store holds none."""

    async def snapshot(
        self, now: float, *, top: int = 20, configs: SnapshotConfigs | None = None
    ) -> StoreSnapshot:
        """A read-only view of the state for the live state page (`state/snapshot.py`).

        `top`: how many limiter keys to list (the busiest). `configs`: breaker and
        retry configs by key, for stores that hold windows only as numbers.
        """
        return StoreSnapshot(
            kind=type(self).__name__,
            source=self.source,
            age_s=0.0,
            notes=("this store offers no snapshot of its state",),
        )


def state_why(store: object) -> str | None:
    """Why a shared store decides without its state now (`fallback_why`: "unreachable",
    "read_only"); None while it has it, or for a store that cannot say."""
    why = getattr(store, "fallback_why", None)
    return why if isinstance(why, str) else None


def state_age_s(store: object) -> float:
    """How long ago `store` last answered (`fallback_age`; 0 when it cannot say): the
    age of a decision taken without it, so a record says how long the state was gone."""
    age = getattr(store, "fallback_age", None)
    if age is None:
        return 0.0
    try:
        return float(age())
    except Exception:  # a record's age must not cost the request its answer
        return 0.0
