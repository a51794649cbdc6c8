"""Review 41: `breaker.scope = "process"` keys read back on the admin page.

With `scope = "process"` a route's breaker on a shared store is kept under
`route:<route>@<process id>` (`state.base.breaker_home`). The admin page finds the
config of each breaker key it lists (its window and open time age the counts): an
upstream's key had its `@<id>` taken off (review 40), a route's did not. This process's
own route breakers were found through its cached plans, but every other process's
(`route:orders@<their id>`) missed the `[[route]]` entry and was read with the policy's
`[breaker]`: another window and open time for the same breaker. A route whose name or
path holds an "@" (`/@{user}`, a handle) is found with or without a process's id.
"""

from __future__ import annotations

from fidelity_mw.admin.view import snapshot_configs
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RouteConfig

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
