"""The page's data: a store snapshot turned into JSON-ready dicts, client keys hashed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from ..decide.budget import budget_allowance
from ..engine import Engine
from ..policy import BreakerConfig, RetryConfig
from ..state.snapshot import BreakerView, SnapshotConfigs, StoreSnapshot

_MAX_SEEN = 10_000


def key_hasher(engine: Engine) -> Callable[[str], str]:
    """Telemetry's client-key hash when it is on (the page and the traces then agree),
    else a keyed BLAKE2b with a random per-process key."""
    telemetry_hash = getattr(engine.request_observer, "hash_client_key", None)
    if callable(telemetry_hash):
        return lambda key: str(telemetry_hash(key))
    salt = os.urandom(16)
    return lambda key: hashlib.blake2b(
        key.encode("utf-8", "surrogateescape"), key=salt, digest_size=8
    ).hexdigest()


def snapshot_configs(engine: Engine) -> SnapshotConfigs:
    """Breaker and retry configs by state key, from the engine's plans and policy."""
    policy = engine.policy

    def breaker(key: str) -> BreakerConfig | None:
        kind, _, subject = key.partition(":")
        if kind == "route":
            for plan in list(getattr(engine, "_plans", {}).values()):
                if getattr(plan, "breaker_key", None) == key:
                    found: BreakerConfig | None = plan.breaker
                    return found
            for route in policy.routes:
                if subject in (route.name, route.match) and isinstance(
                    route.breaker, BreakerConfig
                ):
                    return route.breaker
            return policy.breaker
        if kind == "upstream":
            return policy.upstream_for(subject.rsplit(":", 1)[0]).breaker
        return None

    def retry(key: str) -> RetryConfig | None:
        subject = key.partition(":")[2]
        for upstream in policy.upstreams:
            if upstream.host == subject:  # a shared budget is keyed by the host glob
                return upstream.retry
        return policy.upstream_for(subject.rsplit(":", 1)[0]).retry

    return SnapshotConfigs(breaker=breaker, retry=retry)


class Since:
    """When each breaker entered its state, where the store cannot say: the first time
    this page saw that epoch (a lower bound, marked as such)."""

    def __init__(self) -> None:
        self.first_seen: dict[tuple[str, int], float] = {}

    def of(self, view: BreakerView, now: float) -> tuple[float | None, str]:
        if view.since_s is not None:
            return view.since_s, "store"
        if view.epoch == 0:
            return None, "start"  # never changed state
        seen = self.first_seen
        if len(seen) >= _MAX_SEEN:
            seen.clear()
        first = seen.setdefault((view.key, view.epoch), now)
        return now - first, "observed"


def render(
    engine: Engine,
    snap: StoreSnapshot,
    now: float,
    since: Since,
    hash_key: Callable[[str], str],
) -> dict[str, Any]:
    limits = {lim.name: lim for lim in engine.policy.rate_limits}
    configs = snapshot_configs(engine)
    breakers = []
    for view in snap.breakers:
        since_s, basis = since.of(view, now)
        kind, _, subject = view.key.partition(":")
        breakers.append(
            {
                "key": view.key,
                "kind": kind,
                "subject": subject,
                "state": view.state,
                "since_s": _round(since_s),
                "since_basis": basis,
                "calls": view.calls,
                "failures": view.failures,
                "slow": view.slow,
                "consecutive": view.consecutive,
                "probes": view.probes,
                "retry_after_s": _round(view.retry_after_s),
                "source": view.source,
                "age_s": _round(view.age_s),
            }
        )
    keys = []
    for item in snap.limiter_keys:
        name, _, client = item.key.partition("|")
        lim = limits.get(name)
        used = None
        burst = None
        if lim is not None:
            burst = lim.burst_size
            used = min(burst, round(item.backlog_s / lim.emission_interval_s, 2))
        keys.append(
            {
                "limit": name,
                "key_hash": hash_key(client),
                "backlog_s": _round(item.backlog_s),
                "used": used,
                "burst": burst,
                "held": item.held,
                "source": item.source,
                "age_s": _round(item.age_s),
            }
        )
    budgets = []
    for budget in snap.budgets:
        cfg = configs.retry(budget.key)
        allowance = budget_allowance(budget.requests, cfg) if cfg is not None else None
        budgets.append(
            {
                "key": budget.key,
                "requests": budget.requests,
                "retries": budget.retries,
                "allowance": _round(allowance),
                "source": budget.source,
                "age_s": _round(budget.age_s),
            }
        )
    instances = [
        {
            "service": inst.service,
            "address": inst.address,
            "ejected": inst.ejected,
            "ejected_for_s": _round(inst.ejected_for_s),
            "source": inst.source,
            "age_s": _round(inst.age_s),
        }
        for inst in snap.instances
    ]
    return {
        "generated_at": engine.clock.wall(),
        "policy_version": engine.policy.version,
        "store": {
            "kind": snap.kind,
            "source": snap.source,
            "age_s": _round(snap.age_s),
            "limiter_key_count": snap.limiter_key_count,
            "detail": dict(snap.detail),
            "notes": list(snap.notes),
        },
        "breakers": breakers,
        "limiter_keys": keys,
        "budgets": budgets,
        "instances": instances,
        "layers": [render(engine, layer, now, since, hash_key) for layer in snap.layers],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
