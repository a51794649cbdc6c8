"""What the outbound layer knows about one upstream: its policy, and a service's instances."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import httpx

from .._types import Clock
from ..decide.balance import EWMA_TAU_S, InstanceView
from ..engine import Engine
from ..policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from ..policy.model import _base_urls
from ..state.base import breaker_home
from ..state.local import OutboundCells
from .hedge import LatencyWindow
from .wire import (
    Address,
    Stamps,
    address_of,
    advertised_ms,
    connected_peer_trusted,
    first_stamps,
    in_system,
    literal_peer_trusted,
    uncut_s,
)

# A resolver names the instance base URLs of a logical host, or None when the
# host is not a service it knows (then the policy's `instances`, if any, apply).
Resolver = Callable[[str], Sequence[str] | None]


def resolved_problem(urls: Sequence[str]) -> str | None:
    """What is wrong with a resolver's answer, held to the rule for the policy's
    `instances` (base URLs only), or None. A bad URL would send every call it
    is picked for to no host, or to a wrong one."""
    if isinstance(urls, str | bytes):
        return f"expected a list of base URLs, got a string: {urls!r}"
    try:
        problem = _base_urls(list(dict.fromkeys(urls)))
    except TypeError as exc:  # unhashable items
        return f"expected a list of base URLs ({exc})"
    return problem


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


_MAX_INSTANCES: Final = 256
_new_tuple: Final = tuple.__new__
# The last request timeouts seen (None: the request had none) and what an attempt's are
# then, when the whole attempt timeout fits in the deadline (None: the request's own),
# with a first attempt's headers for them (`loop.attempt_timeouts`).
TimeoutsSeen = tuple[Mapping[str, float | None] | None, Mapping[str, float | None] | None, Stamps]


class Instance:
    """One instance of a service: where it is, and what this process saw of it.

    Mutable, per transport, in process memory: requests in flight, the latency
    EWMA, and the breaker state last learned from the store (with its time).
    """

    __slots__ = (
        "address",
        "answered",
        "breaker_key",
        "failed_at",
        "host",
        "key",
        "latency_at",
        "latency_s",
        "open_until",
        "outstanding",
        "paused_until",
        "port",
        "ramp_at",
        "ramp_last",
        "ramp_sent",
        "scheme",
        "seen_at",
        "sni",
        "trusted",
        "url",
    )

    def __init__(self, base_url: str, engine: Engine, breaker: BreakerConfig | None = None) -> None:
        url = httpx.URL(base_url)
        self.url = base_url
        self.scheme = url.scheme
        self.host = url.host
        self.port = url.port
        self.address: Address | None = address_of(url)  # (parsed, for `wire.at_instance`)
        self.key = self.host if self.port is None else f"{self.host}:{self.port}"
        self.breaker_key = breaker_home("upstream:" + self.key, breaker, engine.store)
        self.trusted: bool | None = literal_peer_trusted(self.host, engine.trusted_peers)
        # HTTPS to an address: TLS names the service (SNI, and the certificate is verified
        # against its name), not the address (`loop.attempts` sets `sni_hostname`).
        self.sni = self.scheme == "https" and _is_address(self.host)
        self.outstanding = 0
        self.latency_s = 0.0
        self.latency_at = 0.0
        self.open_until = 0.0
        self.seen_at = 0.0
        # The end of the pause a 429's Retry-After from this instance put on retries to it
        # (over early once an attempt sent after that answer succeeds: `Upstream.unpause`).
        self.paused_until = 0.0
        # The last attempt sent around its known-open breaker (ejection bound, panic)
        # succeeded: evidence it answers again before its breaker has probed.
        self.answered = False
        # When its last failed attempt ended, none having succeeded since (0.0: none): the
        # balancer weighs its cost up for a while (`decide.balance.failure_weight`).
        self.failed_at = 0.0
        # The retries that waited for an instance to answer again and went here: since
        # when, the last one when, how many (`decide.balance.ramp_room`).
        self.ramp_at = 0.0
        self.ramp_last = 0.0
        self.ramp_sent = 0

    def view(self, now: float | None = None) -> InstanceView:
        """What the balancer knows; with `now`, the latency estimate as read then (aged)."""
        latency = self.latency_s
        if now is not None:
            at = self.latency_at
            if latency > 0.0 and now > at:  # `decayed`, without its call (a view per pick)
                latency = latency * math.exp(-(now - at) / EWMA_TAU_S)
        # (one C call, not the named tuple's keyword wrapper: every instance, every pick)
        return _new_tuple(
            InstanceView,
            (self.outstanding, latency, self.open_until, self.seen_at, self.paused_until,
             self.failed_at, self.answered),
        )  # fmt: skip


class Upstream:
    """What the transport knows about one upstream (host[:port]) under one policy.

    `paused_until` is the end (monotonic seconds) of the pause an upstream
    429's Retry-After put on retries to this host; for a service, until when
    every one of its instances is paused (each instance's own pause is on the
    `Instance`: one instance's 429 is that instance's overload, not the
    service's). `instances` is the service's instances when the host names a
    service. Both live in process memory, per transport.
    """

    __slots__ = (
        "attempt_timeout_s",
        "breaker",
        "breaker_key",
        "breaker_keys",
        "budget_key",
        "cells",
        "cfg",
        "clock",
        "default_deadline_s",
        "fail_statuses",
        "failure_fade_s",
        "failure_penalty",
        "first_stamps",
        "heard_ours",
        "hedge",
        "host",
        "instances",
        "key",
        "last_answer",
        "listening",
        "mark",
        "max_ejected_ratio",
        "panic_threshold",
        "parked",
        "paused_until",
        "plain",
        "policy",
        "proxied",
        "resolved",
        "retry",
        "retry_methods",
        "retry_statuses",
        "service_paused_until",
        "shut",
        "speaks",
        "timeout_header",
        "timeouts",
        "trusted",
        "uncut_s",
        "window",
    )

    def __init__(self, engine: Engine, host: str, port: int | None) -> None:
        policy = engine.policy
        cfg = policy.upstream_for(host)
        self.policy: Policy = policy
        # The engine's mark for its plans under this policy (`Engine.plan_mark`): the plan
        # is used under that engine and policy alone
        self.mark: object = engine.plan_mark
        self.cfg: UpstreamConfig = cfg
        # The clock the times below are read on (`new_clock`)
        self.clock: Clock = engine.clock
        self.host = host
        self.key = host if port is None else f"{host}:{port}"
        # The host's plan under the policy used before this one (`_Base.upstream`): a
        # transport used inside requests and outside them switches back and forth.
        self.parked: Upstream | None = None
        # [True] once the transport that owns this plan is closed (`_Base.upstream`): a
        # body read after that breaks by our doing, not the upstream's (outbound/body.py).
        self.shut: list[bool] = [False]
        self.retry: RetryConfig = cfg.retry
        self.breaker: BreakerConfig | None = cfg.breaker
        self.breaker_key = breaker_home("upstream:" + self.key, cfg.breaker, engine.store)
        # One budget per host, or one for every host of the entry (a service's instances).
        self.budget_key = "budget:" + (cfg.host if cfg.shared_budget else self.key)
        # The host's breaker and budget cells on in-process state, fetched by a first
        # attempt (`loop.cells_of`): none yet (held for no store's operations).
        self.cells = OutboundCells(self.breaker_key, cfg.breaker, self.budget_key, cfg.retry)
        self.attempt_timeout_s = cfg.attempt_timeout_ms / 1000.0
        # a deadline further away than this leaves the attempt its whole timeout
        self.uncut_s = uncut_s(self.attempt_timeout_s)
        self.timeout_header = advertised_ms(cfg.attempt_timeout_ms)
        # Per-call work done once: a first attempt's headers (when the deadline leaves
        # the whole attempt timeout), and the attempt's timeouts for the last request
        # timeouts seen (a client sends equal ones with every request).
        self.timeouts: TimeoutsSeen | None = None
        self.speaks = False  # are our protocol headers sent to it (`_speak`)
        # Judging it by the address its first answer came from (`heard`)? Found ours so?
        self.listening = False
        self.heard_ours = False
        self.first_stamps: Stamps = ()
        default_ms = policy.deadline.default_ms
        self.default_deadline_s = default_ms / 1000.0 if default_ms is not None else None
        # A host the client names (`client_chosen`) is a stranger wherever it resolves: an
        # address inside `trusted_peers` there is the request forgery's target, not ours.
        self.trusted: bool | None = (
            False if cfg.client_chosen else literal_peer_trusted(host, engine.trusted_peers)
        )
        # Reached through a proxy (set by the transport): the address a connection reached
        # is the proxy's, which says nothing of the upstream's (`decisions.trusted_peer`).
        self.proxied = False
        # A 429 is never a breaker failure: it says "slow down", not "down".
        self.fail_statuses: frozenset[int] = (
            frozenset(cfg.breaker.failure_statuses) - {429}
            if cfg.breaker is not None
            else frozenset()
        )
        retry_statuses = set(cfg.retry.on_status) - {429}
        if cfg.retry.on_429:
            retry_statuses.add(429)
        self.retry_statuses: frozenset[int] = frozenset(retry_statuses)
        # The methods retried without an Idempotency-Key (`[upstream.retry] methods`).
        self.retry_methods: frozenset[str] = frozenset(cfg.retry.methods)
        self.paused_until = 0.0
        # A service's own pause (`retry_after_scope = "service"`): every instance's, those
        # named later too (`paused_until` is never below it)
        self.service_paused_until = 0.0
        # What each call reads of the config, read once (a service's balancer, hedging)
        self.panic_threshold = cfg.panic_threshold
        self.max_ejected_ratio = cfg.max_ejected_ratio
        self.failure_penalty = float(cfg.failure_penalty)
        self.failure_fade_s = float(cfg.failure_fade_s)
        self.hedge = hedge = cfg.hedge
        # Attempt latencies, kept only when a hedge delay is the upstream's p95.
        self.window = LatencyWindow() if hedge is not None and hedge.after == "p95" else None
        self.resolved: tuple[str, ...] = ()
        # the resolver's last answer as given (duplicates and all, or one that was
        # refused): an unchanged answer is not checked again
        self.last_answer: tuple[object, ...] = ()
        self.instances: list[Instance] | None = None
        # The instances' breaker keys (a balancer's fresh read of them), with the list
        # they are of: one tuple, replaced whole (the sync transport's threads).
        self.breaker_keys: tuple[list[Instance] | None, list[str]] = (None, [])
        # no instances, no hedging: the async shortcut makes its first attempt
        self.plain = hedge is None
        self._speak(engine)
        if cfg.instances:
            self.set_instances(engine, cfg.instances)

    def _speak(self, engine: Engine) -> None:
        """Decide, once per upstream (and per naming of a service's instances), whether
        attempts carry our protocol headers (`x-fidelity-attempt`, `x-request-timeout-ms`):
        they are our cross-service protocol, spoken with hosts that are part of the
        system only (`protocol_headers`: `auto` judges by the address or name, see
        `wire.in_system`; a service, by all of its instances), never with a third party."""
        mode = self.cfg.protocol_headers
        if mode == "auto" and self.cfg.client_chosen:
            self.listening = False  # (its address is no evidence: see `trusted`)
            self._set_speaks(False)
            return
        if mode == "auto":
            nets = engine.trusted_peers
            if self.instances is None:
                speaks = in_system(self.host, nets)
            else:
                speaks = all(in_system(i.host, nets) for i in self.instances)
        else:
            speaks = mode == "always"
        # A DNS name the rule cannot place (`payments.prod.acme.net`) may still resolve to
        # one of ours: its first answer's address decides (`heard`).
        self.listening = not speaks and mode == "auto" and self.instances is None
        self._set_speaks(speaks)

    def _set_speaks(self, speaks: bool) -> None:
        if speaks != self.speaks or (speaks and not self.first_stamps):
            # In this order: a call building its first attempt in another thread meanwhile
            # (`loop.attempt_timeouts`) sees the new stamps, or its cache entry is cleared.
            self.first_stamps = first_stamps(self.timeout_header) if speaks else ()
            self.speaks = speaks
            self.timeouts = None  # (its cached first-attempt headers were for the other)

    def heard(self, response: httpx.Response, engine: Engine) -> None:
        """A host under a name that may be a third party's, first answered: judged once by
        the address the connection reached, the test that believes its replies
        (`connected_peer_trusted`). Inside `trusted_peers`, it is one of ours after all,
        and its next attempts carry our headers (a call's own retry included); not
        through a proxy, whose address says nothing of the host's. A transport that
        shows no address (a mock) leaves it a stranger."""
        self.listening = False
        if not self.proxied and connected_peer_trusted(response, engine.trusted_peers):
            self.heard_ours = True
            self._set_speaks(True)

    def new_clock(self, clock: Clock) -> None:
        """The engine's clock was swapped (a test's `fake_time()`, which gives the engine
        a fresh state too): the times kept here were read on the old clock and mean
        nothing on the new one. Read on the system clock (tens of thousands of seconds)
        and compared with a fake one's (1,000 at its start), an instance that failed
        before the block was weighed as failing that instant for the whole block (its
        failure younger than every `now`, and only a success sent after it ends it: it
        got no call at all), and a 429's pause outlasted it. Forgotten, as the state is:
        the instances' latencies, failures, pauses and breakers as seen (their calls in
        flight stay: they end on their own)."""
        self.clock = clock
        self.paused_until = self.service_paused_until = 0.0
        for instance in self.instances or ():
            instance.latency_s = instance.latency_at = 0.0
            instance.open_until = instance.seen_at = 0.0
            instance.paused_until = instance.failed_at = 0.0
            instance.answered = False

    def inherit(self, old: Upstream) -> None:
        """A plan built anew for the host (another engine's policy: a transport used inside
        and outside requests) keeps what the old one heard: one of ours, judged by the
        same `trusted_peers`, is not a stranger again for its next first attempt."""
        if (
            old.heard_ours
            and self.listening
            and self.proxied == old.proxied
            and self.policy.trusted_peers == old.policy.trusted_peers
        ):
            self.listening = False
            self.heard_ours = True
            self._set_speaks(True)

    def set_instances(self, engine: Engine, urls: Sequence[str]) -> list[Instance]:
        """(Re)name the service's instances; instances that stay keep what was seen of them.
        Returns the instances no longer named (what was seen of them goes with them)."""
        urls = tuple(dict.fromkeys(urls))[:_MAX_INSTANCES]
        if urls == self.resolved:
            return []
        known = {i.url: i for i in self.instances or ()}
        instances = [known.get(u) or Instance(u, engine, self.breaker) for u in urls] or None
        named = set(urls)
        gone = [i for url, i in known.items() if url not in named]
        self.breaker_keys = (instances, [i.breaker_key for i in instances or ()])
        self.instances = instances
        if self.cfg.client_chosen:
            for instance in instances or ():
                instance.trusted = False
        self.plain = self.instances is None and self.cfg.hedge is None
        self.resolved = urls
        self._speak(engine)
        self._service_pause()
        # A service's budget is one for all its instances: the logical host's (the default).
        return gone

    def pause(self, target: Instance | None, until: float) -> None:
        """A Retry-After pauses retries until `until`: to this host, or, for a service,
        to the instance that answered it (the service is paused only while all of its
        instances are), or (no `target`) to the whole service."""
        if self.instances is None:
            self.paused_until = max(self.paused_until, until)
            return
        if target is None:
            self.service_paused_until = max(self.service_paused_until, until)
        else:
            target.paused_until = max(target.paused_until, until)
        self._service_pause()

    def unpause(self, target: Instance) -> None:
        """The instance answered well an attempt sent after the failure that paused it: its
        own pause is over (a pause of the whole service stays)."""
        target.paused_until = 0.0
        self._service_pause()

    def _service_pause(self) -> None:
        instances = self.instances
        if instances is not None:
            self.paused_until = max(
                self.service_paused_until, min(i.paused_until for i in instances)
            )
