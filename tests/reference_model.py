"""The reference model: small, obviously correct, written from the documented rules,
not from the code under test. Every store (memory, Redis, tiered) is held to it
(tests/test_model_*.py, tests/test_differential.py).

- `RefBucket`: a plain token bucket in exact fractions (capacity `burst`,
  refilled at `count / period` tokens per second, a request of `cost` takes
  `cost` tokens or is refused and takes nothing).
- `RefBreaker`: the breaker rules of docs/inbound.md and decide/breaker.py's
  docstring, over an exact list of timestamped outcomes.
- `RefLedger`: the same bucket replayed over the admitted requests, a refunded
  one removed: what a limiter with refunds may hold at most.
- `RefCredit`: the retry credit refunds earn (a request's cost each, one burst
  at most, expiring), exact.
- `RefBudget`: the retry budget of docs/outbound.md (retries <= ratio x requests +
  floor x window over a sliding window), over exact timestamped events.

The implementation keeps sliding windows in 10 buckets, so an event leaves
its window between 0.9 and 1.0 windows after it happened: the models know
only that, and answer "either" when the outcome depends on where inside that
band the implementation cut. Float arithmetic gets a tolerance of a
hundred-thousandth of a token. Where a model is unsure it reports the set of
answers it accepts; the tests then follow the implementation's answer.

Its own sanity tests (hand-computed cases) are in tests/test_reference_model.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from hypothesis import reject

# A request is surely admitted when the exact bucket holds its cost (less a
# float rounding allowance), surely refused when it is short by more than
# TOKEN_TOL; in between either answer is accepted (the implementation works in
# floats and admits within a millionth of an interval).
TOKEN_TOL = Fraction(1, 100_000)
ROUNDING = Fraction(1, 10_000_000)
# Window edges: events this close to a band edge count as inside the band.
TIME_EPS = 1e-6
BUCKETS = 10


def F(x: float | int | Fraction) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x)


# ---------------------------------------------------------------- token bucket


@dataclass
class BucketAnswer:
    """What the model accepts for one request."""

    allowed: frozenset[bool]  # {True}, {False} or both (threshold within tolerance)
    tokens_before: Fraction  # after refill, before the request


class RefBucket:
    """A token bucket of `burst` tokens refilled at `count / period_s` tokens per second."""

    def __init__(self, count: int, period_s: float, burst: int, start: float) -> None:
        self.count = count
        self.period = F(period_s)
        self.burst = F(burst)
        self.rate = F(count) / self.period  # tokens per second
        self.tokens = self.burst
        self.last = F(start)

    @property
    def interval(self) -> Fraction:
        return self.period / self.count

    def refill(self, now: float) -> Fraction:
        t = F(now)
        assert t >= self.last, "time runs forward"
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
        self.last = t
        return self.tokens

    def ask(self, now: float, cost: int) -> BucketAnswer:
        """Refill, then say whether `cost` tokens are there (without taking them)."""
        tokens = self.refill(now)
        if tokens >= cost - ROUNDING:
            return BucketAnswer(frozenset({True}), tokens)
        if tokens < cost - TOKEN_TOL:
            return BucketAnswer(frozenset({False}), tokens)
        return BucketAnswer(frozenset({True, False}), tokens)

    def take(self, cost: int) -> None:
        self.tokens -= cost

    def is_full(self) -> frozenset[bool]:
        if self.tokens >= self.burst - TOKEN_TOL:
            return frozenset({True}) if self.tokens == self.burst else frozenset({True, False})
        return frozenset({False})

    def reset_full(self) -> None:
        self.tokens = self.burst


class RefLedger:
    """An exact token bucket over the requests it admitted, replayed from the start.

    A refunded request is as if it never happened, so this is the most a
    limiter with refunds may ever hold: an implementation must never admit a
    request this bucket could not (a refund that gives back units that had
    already refilled would)."""

    def __init__(self, count: int, period_s: float, burst: int) -> None:
        self.rate = F(count) / F(period_s)
        self.burst = F(burst)
        self.events: list[list[Any]] = []  # [time, cost, live], in time order

    def tokens(self, now: float) -> Fraction:
        tokens, last = self.burst, None
        for t, cost, live in self.events:
            if not live:
                continue
            if last is not None:
                tokens = min(self.burst, tokens + (t - last) * self.rate)
            tokens -= cost
            last = t
        if last is not None:
            tokens = min(self.burst, tokens + (F(now) - last) * self.rate)
        return tokens

    def admit(self, now: float, cost: int) -> int:
        self.events.append([F(now), cost, True])
        return len(self.events) - 1

    def refund(self, index: int) -> None:
        self.events[index][2] = False


class RefCredit:
    """Retry credit (docs/inbound.md): each refund credits its request's cost, at most
    one burst in all, until `window` seconds after the last refund that earned some;
    spent only by a request the bucket refused. In exact fractions; `epochs` keeps
    the earning refunds of each stretch of live credit, for window bounds."""

    def __init__(self, interval: float, burst: int, window: float) -> None:
        self.interval = Fraction(interval)
        self.cap = burst * self.interval
        self.window = Fraction(window)
        self.balance = Fraction(0)
        self.expires = Fraction(0)
        # credit-earning refunds of the credit alive now: (time, seconds)
        self.epoch: list[tuple[Fraction, Fraction]] = []
        self.epochs: list[list[tuple[Fraction, Fraction]]] = []

    def earn(self, now: float, shortfall: Fraction) -> None:
        t = Fraction(now)
        if self.window <= 0 or shortfall <= Fraction(1, 1_000_000) * self.interval:
            return
        # A refund at the expiry itself, within the float rounding of `then + window`,
        # may find the credit alive or gone (each a whole different balance from then
        # on): an example that lands there says nothing, and is not drawn again.
        edge = Fraction(1, 1_000_000_000) * max(1, abs(t))
        if self.expires and self.expires - edge <= t < self.expires + edge:
            reject()
        if self.expires <= t:
            self.balance = Fraction(0)
            self.epoch = []
            self.epochs.append(self.epoch)
        self.balance = min(self.cap, self.balance + shortfall)
        self.expires = t + self.window
        self.epoch.append((t, shortfall))

    def answers(self, now: float, cost: int) -> set[bool]:
        need = cost * self.interval
        tol = TOKEN_TOL * self.interval
        t = Fraction(now)
        # A float implementation keeps `now + window` rounded: within that rounding of
        # the expiry it may read the credit as alive or as gone.
        edge = Fraction(1, 1_000_000_000) * max(1, abs(t))
        if t >= self.expires + edge or self.balance < need - tol:
            return {False}
        if t >= self.expires - edge:
            return {True, False}
        return {True} if self.balance >= need + tol else {True, False}

    def spend(self, cost: int) -> None:
        self.balance -= cost * self.interval

    def earned_alive(self, start: float, end: float) -> Fraction:
        """Seconds credited by the refunds of every credit epoch alive in [start, end]."""
        a, b = Fraction(start), Fraction(end)
        total = Fraction(0)
        for epoch in self.epochs:
            if epoch and epoch[0][0] <= b and epoch[-1][0] + self.window > a:
                total += sum(s for t, s in epoch if t <= b)
        return total


def close(a: float, b: float | Fraction, tol: float = 1e-6) -> bool:
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def floors_near(x: Fraction) -> set[int]:
    """The whole-unit counts a float implementation may report for `x` tokens."""
    return {max(0, math.floor(x - TOKEN_TOL)), max(0, math.floor(x + TOKEN_TOL))}


# ---------------------------------------------------------------- sliding windows


def window_cuts(times: list[float], now: float, window_s: float) -> list[int]:
    """Possible numbers of the newest events (times ascending) inside the window at `now`.

    An event of age < window - window/10 is surely in; of age >= window,
    surely out; in between, the implementation's bucket grid decides, and it
    always keeps a suffix of the events (the newest ones).
    """
    band_lo = window_s - window_s / BUCKETS - TIME_EPS
    band_hi = window_s + TIME_EPS
    sure = sum(1 for t in times if now - t < band_lo)
    maybe = sum(1 for t in times if band_lo <= now - t < band_hi)
    return [sure + k for k in range(maybe + 1)]


# ---------------------------------------------------------------- breaker

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class RefCall:
    """A call the model admitted: the epoch it was admitted in and its probe slot (0: none)."""

    epoch: int
    probe: int


@dataclass
class RefBreaker:
    """The documented breaker rules.

    closed: count outcomes in a sliding window of `window_s`; open when the
    window holds >= min_calls and failures >= failure_ratio x calls (or slow
    calls >= slow_call_ratio x calls), or after `consecutive_failures` failures
    in a row (checked after every outcome counted, a success too).
    open: reject until T x (1 + open_jitter x (2r - 1)) has passed (r from the
    shared random source), then half-open. T starts at open_min_s when the
    breaker opens from closed and doubles each time a probe fails (re-opening
    from half-open), never above open_s.
    half-open: at most `half_open_probes` probes in flight; a probe slot not
    reported within probe_lease_s is freed; a probe's success closes, its
    failure (or slowness) re-opens. Outcomes of calls admitted in an earlier
    epoch (every transition is a new epoch) are not counted; a probe slot is
    freed by its own report only while it still holds it.
    """

    failure_ratio: float
    min_calls: int
    window_s: float
    open_s: float
    open_jitter: float
    half_open_probes: int
    probe_lease_s: float
    consecutive_failures: int | None = None
    slow_call_ratio: float | None = None
    open_min_s: float | None = None  # None: a fixed open_s
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    state: str = CLOSED
    epoch: int = 0
    open_until: float = 0.0
    # (time, failed, slow), oldest first, of calls counted since the last close
    events: list[tuple[float, bool, bool]] = field(default_factory=list)
    consecutive: int = 0
    probes: dict[int, float] = field(default_factory=dict)  # probe id -> admitted at
    next_probe: int = 1
    open_period: float = 0.0  # T before jitter, of the current (or last) open state

    @classmethod
    def from_config(cls, cfg, seed: int) -> RefBreaker:  # type: ignore[no-untyped-def]
        return cls(
            failure_ratio=cfg.failure_ratio,
            min_calls=cfg.min_calls,
            window_s=cfg.window_s,
            open_s=cfg.open_s,
            open_jitter=cfg.open_jitter,
            half_open_probes=cfg.half_open_probes,
            probe_lease_s=cfg.probe_lease_s,
            consecutive_failures=cfg.consecutive_failures,
            slow_call_ratio=cfg.slow_call_ratio,
            open_min_s=cfg.open_min_s,
            rng=random.Random(seed),
        )

    # -- transitions
    def _go(self, state: str, now: float) -> None:
        previous, self.state = self.state, state
        self.epoch += 1
        if state == OPEN:
            shortest = self.open_s if self.open_min_s is None else self.open_min_s
            if previous == HALF_OPEN:  # a probe failed: twice as long, at most open_s
                self.open_period = min(self.open_s, 2 * self.open_period)
            elif previous == CLOSED:
                self.open_period = min(self.open_s, shortest)
            r = self.rng.random()
            self.open_until = now + self.open_period * (1.0 + self.open_jitter * (2.0 * r - 1.0))
        if state == CLOSED:
            self.probes.clear()
            self.events.clear()
            self.consecutive = 0

    # -- gate: ("allow" | "probe" | "reject", call or None, acceptable retry-after range)
    def gate(self, now: float) -> tuple[str, RefCall | None, tuple[float, float]]:
        if self.state == CLOSED:
            return "allow", RefCall(self.epoch, 0), (0.0, 0.0)
        if self.state == OPEN:
            if now < self.open_until:
                wait = self.open_until - now
                return "reject", None, (wait, wait)
            self._go(HALF_OPEN, now)
        for pid, started in list(self.probes.items()):
            if started + self.probe_lease_s <= now:
                del self.probes[pid]
        if len(self.probes) < self.half_open_probes:
            pid = self.next_probe
            self.next_probe += 1
            self.probes[pid] = now
            return "probe", RefCall(self.epoch, pid), (0.0, 0.0)
        # full: a slot frees when the oldest probe's lease runs out (or a probe
        # reports); never promise more than one open period
        oldest = min(self.probes.values())
        wait = max(0.0, min(oldest + self.probe_lease_s - now, self.open_s))
        return "reject", None, (wait, wait)

    def should_open(self, now: float) -> frozenset[bool]:
        if self.consecutive_failures is not None and self.consecutive >= self.consecutive_failures:
            return frozenset({True})
        times = [t for t, _, _ in self.events]
        answers = set()
        for n in window_cuts(times, now, self.window_s):
            inside = self.events[len(self.events) - n :] if n else []
            calls = len(inside)
            failures = sum(1 for _, f, _ in inside if f)
            slow = sum(1 for _, _, s in inside if s)
            if calls < self.min_calls:
                answers.add(False)
                continue
            if F(failures) >= F(self.failure_ratio) * calls or (
                self.slow_call_ratio is not None and F(slow) >= F(self.slow_call_ratio) * calls
            ):
                answers.add(True)
            else:
                answers.add(False)
        return frozenset(answers)

    def open_now(self, now: float) -> None:
        """Settle an ambiguous `record` (both states accepted) as "it opened"."""
        assert self.state == CLOSED
        self._go(OPEN, now)

    def record(self, call: RefCall, outcome: str, now: float, slow: bool) -> frozenset[str]:
        """Report a finished call. Returns the states the model accepts afterwards.

        Two states ({closed, open}) when the window edge makes opening
        ambiguous: the model stays closed; `open_now` settles it the other way.
        """
        if call.probe:
            if call.probe not in self.probes:
                return frozenset({self.state})  # lease ran out: a stale report
            del self.probes[call.probe]
        if outcome == "ignored" or call.epoch != self.epoch:
            return frozenset({self.state})
        failed = outcome == "failure"
        if self.state == HALF_OPEN:
            if call.probe:
                self._go(OPEN if failed or slow else CLOSED, now)
            return frozenset({self.state})
        if self.state != CLOSED:
            return frozenset({self.state})
        self.events.append((now, failed, slow))
        self.consecutive = self.consecutive + 1 if failed else 0
        # Every counted outcome re-checks the window: a success that brings the
        # window to min_calls opens it when the failures already there suffice.
        answers = self.should_open(now)
        if len(answers) == 2:
            return frozenset({CLOSED, OPEN})
        if True in answers:
            self._go(OPEN, now)
        return frozenset({self.state})


# ---------------------------------------------------------------- retry budget


@dataclass
class RefBudget:
    """retries <= ratio x requests + floor_per_s x window, over a sliding window."""

    ratio: float
    floor_per_s: float
    window_s: float
    requests: list[float] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)

    def request(self, now: float) -> None:
        self.requests.append(now)

    def allowed(self, now: float) -> frozenset[bool]:
        """Would one more retry fit? (Both, when the window edge decides.)"""
        answers = set()
        allowance_floor = F(self.floor_per_s) * F(self.window_s)
        for n_req in window_cuts(self.requests, now, self.window_s):
            for n_ret in window_cuts(self.retries, now, self.window_s):
                # events of both kinds leave by the same bucket grid: a request
                # and a retry of the same instant are either both in or both out
                if not self._consistent(n_req, n_ret, now):
                    continue
                allowance = F(self.ratio) * n_req + allowance_floor
                if F(n_ret + 1) <= allowance:
                    answers.add(True)
                elif F(n_ret + 1) > allowance + TOKEN_TOL:
                    answers.add(False)
                else:
                    answers.update((True, False))
        return frozenset(answers)

    def _consistent(self, n_req: int, n_ret: int, now: float) -> bool:
        """Both cuts must come from one cut time: no retry kept that is older than a
        request dropped, and vice versa."""
        req_in = self.requests[len(self.requests) - n_req :] if n_req else []
        req_out = self.requests[: len(self.requests) - n_req]
        ret_in = self.retries[len(self.retries) - n_ret :] if n_ret else []
        ret_out = self.retries[: len(self.retries) - n_ret]
        oldest_in = min([*req_in, *ret_in], default=math.inf)
        newest_out = max([*req_out, *ret_out], default=-math.inf)
        return newest_out <= oldest_in + TIME_EPS

    def spend(self, now: float) -> None:
        self.retries.append(now)
