"""Circuit breaker state machine, pure: time and randomness come in as arguments.

closed --(ratio over a sliding window with >= min_calls, checked after every
outcome, or N consecutive failures)--> open --(open time ± jitter)-->
half_open --(a probe succeeds)--> closed; a failed probe re-opens. Half-open
admits at most `half_open_probes` concurrent probes; a probe that never
reports frees its slot after `probe_lease_s`.

Recovery follows evidence: the open time starts at `open_min_s` and doubles
with every half-open round whose probe failed, up to `open_s`; a successful
probe closes the breaker and starts over (the next opening from closed starts
at `open_min_s` again). A short outage costs a short open
period; a long one is probed ever more rarely (`open_time`).

Every transition bumps `epoch`. A call carries the epoch it was admitted in;
outcomes from an older epoch are not counted (a call admitted before the
breaker opened must not close it, nor re-open it). A probe's slot says the
same: a transition marks the probes in flight stale (they keep their slots),
so a probe found unmarked was admitted in the current epoch. A caller that
chose the probe id (`gate(..., probe_id=)`) and lost the answer (a shared
store's reply timed out) reports its outcome by that id alone (`ANY_EPOCH`):
it counts if the state did admit it as a probe of this round, and changes
nothing otherwise.

A call is recorded when its answer's head arrives; its body may break later (the
upstream drops the connection mid-stream). That late report, `BROKEN`, turns the
call's success into a failure, so N calls whose bodies break weigh exactly as N
calls that failed outright (`record`). It is a correction, not one more call: counted
as a new failure, every broken body would also leave its success in the window, and
an upstream breaking every body would sit at a failure ratio of 0.5.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

from .fields import replaced, shown
from .specs import BreakerParams, RandomSource
from .window import buckets_passed

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

SUCCESS: Final = "success"
FAILURE: Final = "failure"
IGNORED: Final = "ignored"  # neither: limiter rejection, client disconnect, cancellation
# A call recorded as a success whose body then broke: its success becomes a failure
BROKEN: Final = "broken"

_BUCKETS: Final = 10

# The epoch of a probe outcome whose caller never learnt its gate's (see `record`).
ANY_EPOCH: Final = -1


def open_time(cfg: BreakerParams, reopens: int) -> float:
    """The open period (before jitter) after `reopens` failed half-open rounds in a row:
    open_min_s doubled per round, capped at open_s (open_min_s >= open_s: always open_s)."""
    first = min(cfg.open_min_s, cfg.open_s)
    return min(cfg.open_s, first * 2.0 ** min(reopens, 62))


def known_open_s(state: str, retry_after_s: float, cfg: BreakerParams) -> float:
    """How long a balancer takes an instance for open after its breaker refused a call in
    `state` with `retry_after_s`: that wait, but a half-open refusal (its probe slots
    taken) for the shortest open time at most, since a probe may close it any moment.
    One rule for a gate's answer (Redis, tiered) and an in-process store's read of its
    breaker (memory), so both take an instance out of rotation for as long."""
    wait = max(retry_after_s, 0.001)
    if state == HALF_OPEN:
        wait = min(wait, open_time(cfg, 0))
    return wait


def streak_stands(
    consecutive_failures: int | None,
    streak: int,
    since: float,
    now: float,
    wait_s: float,
    ended: bool = False,
) -> tuple[float, bool]:
    """Tiered state: does a fleet-wide failure streak that syncs brought to
    `consecutive_failures` open the breaker now? (since, opens); `since` is when the
    streak reached it, to keep (0.0: it has not).

    A sync sends a process's outcomes in its own order, as runs; other processes'
    calls in the same interval come in their own syncs, before or after it, and no
    process knows the order across them. One process failing every call among another's
    successes (never 5 failures in a row in the fleet's order) read as a streak of 40 and
    opened a `consecutive_failures = 5` breaker for the fleet. So a streak that a sync
    brings to the threshold opens only once it has stood for `wait_s` (two sync
    intervals: every process with traffic syncs within one): a success any process
    syncs meanwhile ends it, as every success does (sync.lua: the streak is the hash's
    `co`). An upstream down for everyone sends no success: the breaker opens one wait
    later than the exact store would. `wait_s` 0: at once, as the exact store decides.
    A `since` after `now` was stored before the clock went back: the wait runs from now.
    `ended`: a success this sync brought ended the streak `since` is of, so `streak` is
    a new one, failures after it in the same sync, and its wait starts now (kept, the
    ended streak's time opened the new one at the next sync past the old wait, before
    the successes other processes had meanwhile were synced). lib.lua's `streak_stands`
    mirrors it.
    """
    if consecutive_failures is None or consecutive_failures <= 0:
        return 0.0, False
    if streak < consecutive_failures:
        return 0.0, False
    if ended or since <= 0.0 or since > now:
        since = now
    return since, now - since >= wait_s


class Gate:
    """The breaker's answer before a call. A slotted record, not a tuple (as
    `decide.gcra.LimitVerdict`): fields by name; `_replace`, `_fields`, equality and
    hashing as a NamedTuple's. Treat it as immutable."""

    __slots__ = ("epoch", "probe_id", "retry_after_s", "sent_probe_id", "state", "verdict")

    _fields: ClassVar[tuple[str, ...]] = (
        "verdict",
        "state",
        "epoch",
        "retry_after_s",
        "probe_id",
        "sent_probe_id",
    )

    def __init__(
        self,
        verdict: str,  # "allow" | "probe" | "reject"
        state: str,
        epoch: int,
        retry_after_s: float,  # when rejected: time until a probe may be admitted
        probe_id: int = 0,  # non-zero for a probe: hand it back to `record`
        # A shared store's fallback gate whose admission was sent with this probe id and
        # its answer lost (a timeout): the shared state may have made the call a probe,
        # so its outcome goes there too, by that id alone (`ANY_EPOCH`), once it answers.
        sent_probe_id: int = 0,
    ) -> None:
        self.verdict = verdict
        self.state = state
        self.epoch = epoch
        self.retry_after_s = retry_after_s
        self.probe_id = probe_id
        self.sent_probe_id = sent_probe_id

    def _replace(self, **changes: Any) -> Gate:
        """A copy with these fields changed (NamedTuple's `_replace`)."""
        return replaced(self, changes)

    def _key(self) -> tuple[str, str, int, float, int, int]:
        return (
            self.verdict,
            self.state,
            self.epoch,
            self.retry_after_s,
            self.probe_id,
            self.sent_probe_id,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gate):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return shown(self)

    def __reduce__(self) -> tuple[type[Gate], tuple[Any, ...]]:
        # Pickled and copied by the constructor, as a NamedTuple: compiled, a native
        # class cannot be made without its __init__'s arguments (pickle's default did).
        return Gate, self._key()


class BreakerState:
    """One breaker's state. Mutated only through `gate` and `record`."""

    __slots__ = (
        "_bucket_end",
        "_bucket_s",
        "_totals",
        "buckets",
        "closed_by",
        "closed_gate",
        "config",
        "consecutive",
        "epoch",
        "erased",
        "next_probe_id",
        "open_until",
        "opened_at",
        "probes",
        "reopens",
        "state",
    )

    def __init__(self, config: BreakerParams) -> None:
        self.config = config
        self.state: str = CLOSED
        self.epoch = 0
        self.open_until = 0.0
        self.opened_at = 0.0
        self.consecutive = 0
        # The failure streak the last success ended (0 once a failure came after it): a
        # body that breaks after that success puts it back (`_broken`).
        self.erased = 0
        # Half-open rounds in a row whose probe failed. Kept through a close (only an
        # opening from closed starts it over), so a probe whose body broke after its
        # success closed the breaker re-opens it as its failure would have.
        self.reopens = 0
        # The probe whose success closed the breaker (0: none, or forced): only its body
        # breaking overturns that verdict (`_broken`).
        self.closed_by = 0
        # Sliding window as a ring of [calls, failures, slow] buckets; the
        # current bucket is the last one.
        self._bucket_s = config.window_s / _BUCKETS
        self._bucket_end = 0.0
        self.buckets: list[list[int]] = [[0, 0, 0] for _ in range(_BUCKETS)]
        # [calls, failures, slow] summed over the buckets, kept in step with them so
        # the ratios can be checked after every outcome in O(1).
        self._totals = [0, 0, 0]
        self.probes: dict[int, float] = {}  # probe id -> start time, for probes in flight
        # The answer for the common case, built once per epoch instead of per call
        # (read directly by the in-process store's hot path).
        self.closed_gate = Gate("allow", CLOSED, 0, 0.0)
        self.next_probe_id = 1

    # ------------------------------------------------------------ queries

    def totals(self, now: float) -> tuple[int, int, int]:
        self._rotate(now)
        calls, failures, slow = self._totals
        return calls, failures, slow

    def refusing(self, now: float) -> tuple[str, float]:
        """What `gate(now)` would refuse with, without taking a slot or changing anything:
        (state, retry_after_s) of its rejection, or ("", 0.0) when it would admit the
        call. A half-open breaker whose probe slots are all held refuses (its probes are
        in flight), as does an open one due to half-open whose stale probes of an earlier
        round still hold them."""
        state = self.state
        if state == CLOSED:
            return "", 0.0
        cfg = self.config
        if state == OPEN and now < self.open_until:
            most = open_time(cfg, self.reopens) * (1.0 + cfg.open_jitter)
            return OPEN, min(self.open_until - now, most)  # (`gate`'s clock-step bound)
        lease = cfg.probe_lease_s
        # (a start after `now`: the clock went back, its lease runs from now, as in `gate`)
        held = [min(t, now) for t in self.probes.values() if min(t, now) + lease > now]
        if len(held) < cfg.half_open_probes:
            return "", 0.0
        return HALF_OPEN, max(0.0, min(min(held) + lease - now, cfg.open_s))

    # ------------------------------------------------------------ transitions

    def gate(self, now: float, rng: RandomSource, probe_id: int = 0) -> Gate:
        """May a call go ahead? Admitting a probe takes a slot until `record`, under
        `probe_id` when the caller chose one (> 0), else under the next of its own."""
        state = self.state
        if state == CLOSED:
            return self.closed_gate
        if state == OPEN:
            if now < self.open_until:
                left = self.open_until - now
                cfg = self.config
                most = open_time(cfg, self.reopens) * (1.0 + cfg.open_jitter)
                if left > most:
                    # Opened before the clock went back (Redis TIME after a failover to a
                    # replica whose clock is behind): open for at most its open time from
                    # now, not for as long as the clock was wrong.
                    self.open_until = now + most
                    left = most
                return Gate("reject", OPEN, self.epoch, left)
            self._transition(HALF_OPEN, now, rng)
        # half-open: free slots of probes that never reported
        lease = self.config.probe_lease_s
        probes = self.probes
        if probes and max(probes.values()) > now:
            # started after `now`: the clock went back since; their leases run from now
            for held in [p for p, t in probes.items() if t > now]:
                probes[held] = now
        if probes and min(probes.values()) + lease <= now:
            for held in [p for p, t in probes.items() if t + lease <= now]:
                del probes[held]
        if len(probes) < self.config.half_open_probes:
            if probe_id <= 0:
                probe_id = self.next_probe_id
                self.next_probe_id += 1
            probes[probe_id] = now
            return Gate("probe", HALF_OPEN, self.epoch, 0.0, probe_id)
        wait = min(probes.values()) + lease - now
        return Gate("reject", HALF_OPEN, self.epoch, max(0.0, min(wait, self.config.open_s)))

    def record(
        self,
        epoch: int,
        probe_id: int,
        outcome: str,
        now: float,
        rng: RandomSource,
        slow: bool = False,
    ) -> str:
        """Count one finished call (probe_id from its Gate). Returns the state afterwards.
        A probe's outcome counts if its slot is held unmarked (then it was admitted in
        this epoch, whatever `epoch` says: `ANY_EPOCH`); one marked stale, or not held,
        frees its slot and changes nothing else."""
        if (
            outcome == SUCCESS
            and not probe_id
            and not slow
            and now < self._bucket_end
            and self._bucket_end - now <= 2.0 * self._bucket_s  # (else `_rotate`)
            and epoch == self.epoch
            and self.state == CLOSED
        ):
            # Most calls: a success of this epoch, closed, in the current bucket. Without
            # failures or slow calls in the window it cannot open: count it and return.
            totals = self._totals
            if not (totals[1] or totals[2]):
                self.buckets[-1][0] += 1
                totals[0] += 1
                self.erased = self.consecutive
                self.consecutive = 0
                return CLOSED
        if outcome == BROKEN:
            return self._broken(epoch, probe_id, now, rng)
        # A probe whose lease ran out no longer holds a slot; its late report
        # must not free someone else's.
        if probe_id:
            if self.probes.pop(probe_id, None) is None:
                # (marked stale by a transition since: freed, not counted)
                self.probes.pop(-probe_id, None)
                return self.state
        elif epoch != self.epoch:
            return self.state
        if outcome == IGNORED:
            return self.state
        if self.state == HALF_OPEN:
            if probe_id:
                bad = outcome == FAILURE or slow
                self._transition(OPEN if bad else CLOSED, now, rng)
                if not bad:
                    self.closed_by = probe_id
            return self.state
        if self.state != CLOSED:
            return self.state
        self._rotate(now)
        bucket = self.buckets[-1]
        totals = self._totals
        bucket[0] += 1
        totals[0] += 1
        if outcome == FAILURE:
            bucket[1] += 1
            totals[1] += 1
            self.consecutive += 1
            self.erased = 0
        else:
            self.erased = self.consecutive
            self.consecutive = 0
        if slow:
            bucket[2] += 1
            totals[2] += 1
        # Every outcome, a success too: F,F,F,S reaches min_calls on the success.
        # (A window without failures or slow calls cannot open: the common case.)
        if (totals[1] or totals[2]) and self._should_open(now):
            self._transition(OPEN, now, rng)
        return self.state

    def _broken(self, epoch: int, probe_id: int, now: float, rng: RandomSource) -> str:
        """A call recorded as a success (gate `epoch`, `probe_id`) whose body then broke.

        - A probe: its success closed the breaker (its round's verdict). While the breaker
          is still closed in the epoch that verdict began, it re-opens as the probe's
          failure would have (for the next, longer open time). Later (the breaker moved
          on), or if its success did not close it, nothing.
        - Any other call, admitted in the current epoch of a closed breaker: the newest
          success still in the window becomes a failure (the call's own, or one counted
          after it: the counts are the same); none left there (the call outlived its
          bucket), a failed call is counted now. The failure streak the last success
          ended goes on with this failure unless a failure came in between (exact when
          calls follow one another; with bodies broken concurrently, a streak two
          successes ago is not restored: the ratio still counts every failure). From
          an earlier epoch: nothing, as for any outcome.
        """
        if probe_id:
            # (another probe of its round that reports a late success is not counted:
            # its broken body weighs as its failure would, nothing)
            if self.state == CLOSED and self.epoch == epoch + 1 and self.closed_by == probe_id:
                self.state = HALF_OPEN  # (the round it ended: a failed probe's re-opening)
                self._transition(OPEN, now, rng)
            return self.state
        if epoch != self.epoch or self.state != CLOSED:
            return self.state
        # (also a bucket end far ahead, set before the clock went back: lib.lua's
        # br_broken rotates first too, and a streak that opens the breaker below checks
        # no window that would rotate it)
        self._rotate(now)
        buckets = self.buckets
        totals = self._totals
        for bucket in reversed(buckets):
            if bucket[0] > bucket[1]:  # a success to turn
                bucket[1] += 1
                break
        else:
            bucket = buckets[-1]
            bucket[0] += 1
            bucket[1] += 1
            totals[0] += 1
        totals[1] += 1
        self.consecutive += self.erased + 1
        self.erased = 0
        if self._should_open(now):
            self._transition(OPEN, now, rng)
        return self.state

    def force(self, state: str, now: float, rng: RandomSource) -> None:
        """Operator override (and test helper): move to `state` now."""
        self._transition(state, now, rng)

    # ------------------------------------------------------------ internals

    def _should_open(self, now: float) -> bool:
        cfg = self.config
        if cfg.consecutive_failures is not None and self.consecutive >= cfg.consecutive_failures:
            return True
        calls, failures, slow = self.totals(now)
        if calls < cfg.min_calls:
            return False
        if failures >= cfg.failure_ratio * calls:
            return True
        return cfg.slow_call_ratio is not None and slow >= cfg.slow_call_ratio * calls

    def _transition(self, state: str, now: float, rng: RandomSource) -> None:
        previous = self.state
        self.state = state
        self.epoch += 1
        if state == CLOSED:
            self.probes = {}
            self.closed_by = 0
        elif self.probes:
            # Otherwise probes of an earlier half-open round keep their slots until
            # they report (their outcome is stale and not counted) or their lease
            # runs out: they are still real calls on a recovering route. Marked
            # stale (the id negated), a slot says its probe's epoch is gone.
            self.probes = {-abs(p): t for p, t in self.probes.items()}
        if state == OPEN:
            if previous == HALF_OPEN:
                self.reopens += 1
            elif previous == CLOSED:
                self.reopens = 0
            cfg = self.config
            spread = cfg.open_jitter * (2.0 * rng() - 1.0)
            self.opened_at = now
            self.open_until = now + open_time(cfg, self.reopens) * (1.0 + spread)
        elif state == HALF_OPEN:
            if previous == CLOSED:  # (forced)
                self.reopens = 0
        elif state == CLOSED:
            self.closed_gate = Gate("allow", CLOSED, self.epoch, 0.0)
            self.consecutive = self.erased = 0
            for bucket in self.buckets:
                bucket[0] = bucket[1] = bucket[2] = 0
            self._totals = [0, 0, 0]

    def _rotate(self, now: float) -> None:
        if now < self._bucket_end:
            if self._bucket_end - now > 2.0 * self._bucket_s:
                # A bucket end more than two buckets ahead was set before the clock went
                # back (Redis TIME after a failover): the window rotates again from one
                # bucket ahead, rather than counting for as long as the clock was wrong.
                self._bucket_end = now + self._bucket_s
            return
        bucket_s = self._bucket_s
        steps = buckets_passed(now, self._bucket_end, bucket_s)
        buckets = self.buckets
        if steps >= _BUCKETS:
            for bucket in buckets:
                bucket[0] = bucket[1] = bucket[2] = 0
            self._totals = [0, 0, 0]
        else:
            totals = self._totals
            for _ in range(steps):
                oldest = buckets.pop(0)
                totals[0] -= oldest[0]
                totals[1] -= oldest[1]
                totals[2] -= oldest[2]
                oldest[0] = oldest[1] = oldest[2] = 0
                buckets.append(oldest)
        self._bucket_end = (
            now + bucket_s if self._bucket_end == 0.0 else self._bucket_end + steps * bucket_s
        )
