"""Build the state store a policy asks for (`[state] url`)."""

from __future__ import annotations

from .._types import Clock, RandomSource
from ..errors import PolicyError
from ..policy import Policy
from .base import StateStore
from .memory import MemoryStore


def store_from_policy(policy: Policy, rng: RandomSource, clock: Clock) -> StateStore:
    url = policy.state.url
    if url.startswith("memory://"):
        return MemoryStore(max_keys=policy.state.max_keys, rng=rng)
    raise PolicyError.at("state.url", f"{url!r}: this build has no store for that scheme yet")
