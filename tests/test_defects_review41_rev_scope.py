"""Review 41: `breaker.scope = "process"` keys read back on the admin page.

With `scope = "process"` a route's breaker on a shared store is kept under
`route:<route>@<process id>` (`state.base.breaker_home`). The admin page finds the
config of each breaker key it lists (its window and open time age the counts): an
upstream's key had its `@<id>` taken off (review 40), a route's did not. This process's
own route breakers were found through its cached plans, but every other process's
(`route:orders@<their id>`) missed the `[[route]]` entry and was read with the policy's
`[breaker]`: another window and open time for the same breaker. A route whose name or
path holds an "@" (`/@{user}`, a handle) is found with or without a process's id.

`fidelity-mw map` named such a breaker's key without the `@<process id>`: a key no
process keeps.
"""

from __future__ import annotations

from fidelity_mw.admin.view import snapshot_configs
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RouteConfig, StateConfig, UpstreamConfig
from fidelity_mw.tools.statemap import from_policy

OTHER = "7ac44f5f88f0fd2b"  # another process's fleet member id (16 hex digits)


def test_another_processs_route_breaker_has_its_routes_config() -> None:
    own = BreakerConfig(scope="process", window_s=77.0, open_s=9.0)
    policy = Policy(routes=(RouteConfig(match="/orders/*", name="orders", breaker=own),))
    configs = snapshot_configs(Engine(policy))
    assert configs.breaker(f"route:orders@{OTHER}") is own
    assert configs.breaker("route:orders") is own  # (fleet-wide, as before)
    assert configs.breaker("route:unknown") is policy.breaker


def test_a_route_with_an_at_sign_is_found_with_and_without_an_id() -> None:
    own = BreakerConfig(scope="process", window_s=77.0)
    policy = Policy(routes=(RouteConfig(match="/@*", name="team@handles", breaker=own),))
    configs = snapshot_configs(Engine(policy))
    assert configs.breaker("route:team@handles") is own
    assert configs.breaker(f"route:team@handles@{OTHER}") is own


# ---------------------------------------------------------------- fidelity-mw map


def _breaker_keys(policy: Policy) -> list[str]:
    smap = from_policy(policy, "policy.toml")
    return [layer.key for layer in smap.layers if layer.layer == "breaker"]


def test_the_map_names_a_process_breakers_key_with_its_id() -> None:
    """The map named `route:{route}` for a process's own breaker on Redis: a key no
    process keeps (each keeps `route:{route}@<its id>`)."""
    own = BreakerConfig(scope="process")
    redis = StateConfig(url="redis://localhost:6379/0")
    policy = Policy(
        state=redis,
        breaker=own,
        upstreams=(UpstreamConfig(host="payments", breaker=own),),
    )
    keys = _breaker_keys(policy)
    assert "{fmw}:br:H(route:{route}@{process id})" in keys[0]
    assert "{fmw}:br:H(upstream:{host[:port]}@{process id})" in keys[1]
    # the default upstream's breaker is the fleet's: its key as before
    assert keys[2] == "{fmw}:br:H(upstream:{host[:port]}) + {fmw}:bp:H(upstream:{host[:port]})"


def test_the_map_keeps_the_plain_keys_in_memory_and_for_the_fleet() -> None:
    own = BreakerConfig(scope="process")
    assert not any("@" in key for key in _breaker_keys(Policy(breaker=own)))
    redis = StateConfig(url="redis://localhost:6379/0")
    assert not any("@" in key for key in _breaker_keys(Policy(state=redis)))
