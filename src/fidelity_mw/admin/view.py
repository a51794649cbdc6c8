"""The page's data: a store snapshot turned into JSON-ready dicts, client keys hashed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from ..buildinfo import build_name
from ..decide.balance import ejected, failure_weight
from ..decide.budget import budget_allowance
from ..engine import Engine
from ..outbound.hedge import hedge_delay
from ..outbound.upstream import Upstream
from ..policy import BreakerConfig, RetryConfig
from ..state.base import fleet_key
from ..state.snapshot import BreakerView, BudgetView, SnapshotConfigs, StoreSnapshot

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


def snapshot_configs(
    engine: Engine, *, top_breakers: int | None = None, top_budgets: int | None = None
) -> SnapshotConfigs:
    """Breaker and retry configs by state key, from the engine's plans and policy, and
    how many breakers and budgets the page lists (`top_breakers`, `top_budgets`)."""
    policy = engine.policy
    planned: dict[str, BreakerConfig] | None = None

    def route_breakers() -> dict[str, BreakerConfig]:
        # Every cached plan's breaker, by its key, read once per snapshot: the plans
        # by (method, path), and those cached by host and root path (an app with Host
        # routes has only those). A breaker declared on the endpoint in code is
        # known only to its plan; looked up in `_plans` alone, a host-routed app's
        # Redis breakers were aged with the policy's window instead.
        nonlocal planned
        if planned is None:
            planned = {}
            for name in ("_plans", "_host_plans"):
                for plan in list(getattr(engine, name, {}).values()):
                    key = getattr(plan, "breaker_key", None)
                    cfg = getattr(plan, "breaker", None)
                    if isinstance(key, str) and isinstance(cfg, BreakerConfig):
                        planned.setdefault(key, cfg)
                        # (by the key it stands for too: another process's own breaker
                        # of the route, `scope = "process"`, ends in its id, not ours)
                        planned.setdefault(fleet_key(key), cfg)
        return planned

    by_instance: dict[str, BreakerConfig | None] | None = None

    def instance_breakers() -> dict[str, BreakerConfig | None]:
        # A service's instance breakers (`upstream:<instance host:port>`) take the
        # service's breaker: its `instances`, and those its transports' resolvers named.
        # Looked up by the instance's address, they took the `*` entry's (the defaults).
        nonlocal by_instance
        if by_instance is None:
            by_instance = {}
            for up in policy.upstreams:
                for url in up.instances or ():
                    parsed = httpx.URL(url)
                    port = parsed.port
                    address = parsed.host if port is None else f"{parsed.host}:{port}"
                    by_instance.setdefault(address, up.breaker)
            for transport in list(getattr(engine, "transports", None) or ()):
                for current in list((getattr(transport, "_upstreams", None) or {}).values()):
                    plan = _plan_for(current, engine)
                    if plan is None:
                        continue
                    for instance in list(plan.instances or ()):
                        by_instance.setdefault(instance.key, plan.breaker)
        return by_instance

    def breaker(key: str) -> BreakerConfig | None:
        kind, _, subject = key.partition(":")
        if kind == "route":
            planned = route_breakers()
            # a process's own breaker, `scope = "process"`, ends in "@" + its id: read
            # without it, another process's missed its `[[route]]` and took `[breaker]`
            shared = fleet_key(subject)
            found = planned.get(key) or planned.get("route:" + shared)
            if found is not None:
                return found
            for route in policy.routes:
                names = (route.name, route.match)
                if (subject in names or shared in names) and isinstance(
                    route.breaker, BreakerConfig
                ):
                    return route.breaker
            return policy.breaker
        if kind == "upstream":
            # (a process's own breaker, `scope = "process"`, ends in "@" + its id)
            address = subject.partition("@")[0]
            instances = instance_breakers()
            if address in instances:
                return instances[address]
            host = address.rsplit(":", 1)[0]
            return policy.upstream_for(host).breaker
        return None

    def retry(key: str) -> RetryConfig | None:
        subject = key.partition(":")[2]
        for upstream in policy.upstreams:
            if upstream.host == subject:  # a shared budget is keyed by the host glob
                return upstream.retry
        return policy.upstream_for(subject.rsplit(":", 1)[0]).retry

    return SnapshotConfigs(
        breaker=breaker, retry=retry, top_breakers=top_breakers, top_budgets=top_budgets
    )


def route_breakers_in_force(engine: Engine) -> Callable[[str], bool]:
    """Does the route named `subject` (a route breaker key's, `route:` less; a process's
    own, `@<id>`, too) have a breaker under the engine's policy now? Its plans say, when
    any was built since the last swap; else its code, when its endpoint declares one (the
    swap clears the plans, not the code: `Engine.coded_breakers`); else the policy alone
    (its `[[route]]` entry by name or glob, else `[breaker]`). A breaker the store keeps
    for a route that has none any more (a swap that set `breaker = false`) is left out of
    the breaker gauge and this page: nothing uses or updates it again."""
    planned: dict[str, bool] | None = None
    policy = engine.policy

    def in_force(subject: str) -> bool:
        nonlocal planned
        if planned is None:
            planned = {}
            for name in ("_plans", "_host_plans"):
                for plan in list(getattr(engine, name, {}).values()):
                    route = getattr(plan, "route", None)
                    if isinstance(route, str):
                        has = getattr(plan, "breaker", None) is not None
                        planned[route] = planned.get(route, False) or has
        route = fleet_key(subject)
        known = planned.get(route)
        if known is not None:
            return known
        if route in getattr(engine, "coded_breakers", ()):
            return True
        for entry in policy.routes:
            if route in (entry.name, entry.match):
                if isinstance(entry.breaker, BreakerConfig):
                    return True
                if entry.breaker is False:
                    return False
                break
        return policy.breaker is not None

    return in_force


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


def process_info(engine: Engine) -> dict[str, Any]:
    """Which process answered: under `uvicorn --workers N` (or gunicorn) each request for
    the page reaches whichever worker accepted its connection, and each worker has its
    own counters, fallback state and bulkheads. `fleet_id` is the id the process
    announces in Redis (`{prefix}:fleet`), None without fleet membership."""
    store: Any = engine.store
    fleet = getattr(store, "fleet", None)
    if fleet is None:
        fleet = getattr(getattr(store, "exact", None), "fleet", None)  # a tiered store's
    fleet_id = getattr(fleet, "id", None) if getattr(fleet, "enabled", False) else None
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "fleet_id": fleet_id if isinstance(fleet_id, str) else None,
    }


def render(
    engine: Engine,
    snap: StoreSnapshot,
    now: float,
    since: Since,
    hash_key: Callable[[str], str],
    *,
    layer: bool = False,
    top_breakers: int = 200,
    top_budgets: int = 200,
    configs: SnapshotConfigs | None = None,
) -> dict[str, Any]:
    limits = {lim.name: lim for lim in engine.policy.rate_limits}
    if configs is None:
        configs = snapshot_configs(engine)
    breakers = []
    views: Sequence[BreakerView] = snap.breakers
    if len(views) > top_breakers:
        # A memory store holds a breaker per upstream host its calls named (up to its
        # max_breakers): those not closed first, then route breakers, in the store's
        # order. (The stores here list only those already; another store may not.)
        views = sorted(views, key=_breaker_rank)[: max(0, top_breakers)]
    route_in_force = route_breakers_in_force(engine)
    for view in views:
        kind, _, subject = view.key.partition(":")
        if kind == "route" and not route_in_force(subject):
            continue  # (its route has no breaker any more: a swap turned it off)
        # a process's own breaker (`scope = "process"`) is stored under its key + "@" + the
        # process's id (`key` says so): its subject is the route or host, as the gauge
        # names it and as the memory store keeps it
        subject = fleet_key(subject)
        if kind == "upstream" and configs.breaker(view.key) is None:
            # the policy has no breaker there (any more: a swap set `breaker = false`);
            # the store keeps it as it was, which nothing updates again
            continue
        since_s, basis = since.of(view, now)
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
        members, weight = 1, 1.0  # the share 1/N, or a weight (by load)
        share: str | None = None
        if "\x00" in name:
            # a fleet share's key (state/fleet.py): "share 1/N\0<name>", or by load
            # "share <weight>\0<name>"
            tag, _, name = name.partition("\x00")
            share = tag.removeprefix("share ")
            if "/" in share:
                count = share.rpartition("/")[2]
                members = int(count) if count.isdigit() and int(count) > 1 else 1
            else:
                with contextlib.suppress(ValueError):
                    weight = float(share)
                if not 0.0 < weight < 1.0:  # (nan, or not a share)
                    weight = 1.0
            if members == 1 and weight == 1.0:
                share = None
        lim = limits.get(name)
        used = None
        burst: float | None = None
        if lim is not None:
            # a share's bucket: rate / N and burst / N (or x its weight), never below one
            # request's cost
            burst = lim.burst_size
            interval = lim.emission_interval_s
            if members > 1:
                burst = max(lim.fixed_cost, lim.burst_size / members)
                interval = lim.emission_interval_s * members
            elif weight < 1.0:
                burst = max(lim.fixed_cost, lim.burst_size * weight)
                interval = lim.emission_interval_s / weight
            used = min(burst, round(item.backlog_s / interval, 2))
        keys.append(
            {
                "limit": name,
                "fleet_share": share,
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
    budget_views: Sequence[BudgetView] = snap.budgets
    if len(budget_views) > top_budgets:  # one per upstream host: the busiest first
        budget_views = sorted(budget_views, key=_budget_rank)[: max(0, top_budgets)]
    for budget in budget_views:
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
    balanced, hedging = balancers(engine, now)
    head: dict[str, Any] = {
        "generated_at": engine.clock.wall(),
        "policy_version": engine.policy.version,
        "build": build_name(),
    }
    if not layer:
        head["process"] = process_info(engine)
    return {
        **head,
        "store": {
            "kind": snap.kind,
            "source": snap.source,
            "age_s": _round(snap.age_s),
            "limiter_key_count": snap.limiter_key_count,
            # (a store asked for the first `top_breakers` lists only those, and says
            # how many it holds)
            "breaker_count": max(snap.breaker_count or 0, len(snap.breakers)),
            "budget_count": max(snap.budget_count or 0, len(snap.budgets)),
            "detail": dict(snap.detail),
            "notes": list(snap.notes),
        },
        "breakers": breakers,
        "limiter_keys": keys,
        "budgets": budgets,
        "instances": instances,
        "balancer": balanced,
        "hedging": hedging,
        "layers": [
            render(
                engine,
                under,
                now,
                since,
                hash_key,
                layer=True,
                top_breakers=top_breakers,
                top_budgets=top_budgets,
                configs=configs,
            )
            for under in snap.layers
        ],
    }


def balancers(engine: Engine, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What the transports on this engine know of their services' instances (requests in
    flight, latency EWMA, breaker known open, ejected now) and their hedging latency
    windows: process memory, this process's calls only, read as it is (no store call)."""
    instances: list[dict[str, Any]] = []
    hedging: list[dict[str, Any]] = []
    for transport in list(engine.transports):
        # the transport's per-host plans (outbound/upstream.py): read, never changed
        upstreams: dict[Any, Upstream] = getattr(transport, "_upstreams", None) or {}
        for current in list(upstreams.values()):
            up = _plan_for(current, engine)
            if up is None:
                continue
            cfg = up.cfg
            members = list(up.instances or ())
            out = ejected([i.view() for i in members], now, cfg.max_ejected_ratio)
            for index, inst in enumerate(members):
                open_for = inst.open_until - now
                instances.append(
                    {
                        "service": up.key,
                        "instance": inst.key,
                        "outstanding": inst.outstanding,
                        "latency_ms": _round(inst.latency_s * 1000.0) if inst.latency_s else None,
                        "latency_age_s": _round(now - inst.latency_at) if inst.latency_at else None,
                        "failure_weight": _round(
                            failure_weight(inst.failed_at, now, up.failure_fade_s)
                        ),
                        # (the penalty at weight 1: `[[upstream]]` failure_penalty)
                        "failure_penalty": up.failure_penalty,
                        "breaker_open": open_for > 0.0,
                        "open_for_s": _round(open_for) if open_for > 0.0 else None,
                        "ejected": index in out,
                        "source": "memory",
                        "age_s": _round(now - inst.seen_at) if inst.seen_at else None,
                    }
                )
            hedge = cfg.hedge
            if hedge is not None:
                window = up.window
                p95 = window.p95(hedge.min_samples) if window is not None else None
                delay = hedge_delay(hedge.after, hedge.after_ms, hedge.min_samples, window)
                hedging.append(
                    {
                        "upstream": up.key,
                        "after": hedge.after,
                        "samples": len(window.samples) if window is not None else None,
                        "min_samples": hedge.min_samples,
                        "p95_ms": _round(p95 * 1000.0) if p95 is not None else None,
                        "delay_ms": _round(delay * 1000.0),
                        "source": "memory",
                    }
                )
    return instances, hedging


def _breaker_rank(view: BreakerView) -> tuple[bool, bool]:
    return view.state == "closed", not view.key.startswith("route:")


def _budget_rank(view: BudgetView) -> tuple[int, int]:
    return -view.retries, -view.requests


def _plan_for(current: Upstream, engine: Engine) -> Upstream | None:
    """A transport used under several engines (inside requests, outside them) holds a
    plan per host for each policy: the current one, and the one used before it, parked
    (`FidelityTransport.upstream`). This engine's, if either is."""
    mark = getattr(engine, "plan_mark", None)
    if current.mark is mark:
        return current
    parked: Upstream | None = getattr(current, "parked", None)
    return parked if parked is not None and parked.mark is mark else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
