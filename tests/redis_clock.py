"""A controllable clock for the Lua scripts, for tests only.

The scripts decide on the Redis server's own clock (`TIME`): one clock for
the whole fleet. Tests that compare Redis with the memory store step by step
need both to see the same `now`. Production code stays untouched: this
fixture swaps every loaded `Script` of the store modules for a copy whose
`server_now()` first reads a pinned time from the key `fidelity-test:now`
(and falls back to `TIME` when the key is absent). The copy has its own SHA,
so it never mixes with the production scripts in the server's script cache.

Why not an extra `now` argument on every script: it would cost an argument
on every production call and change every script's ARGV layout; the copy
costs production nothing and keeps the scripts under test byte-identical
outside `server_now()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import pytest
import redis

from fidelity_mw.state import redis as redis_module
from fidelity_mw.state import tiered as tiered_module
from fidelity_mw.state.redis import Script

CLOCK_KEY = "fidelity-test:now"

_REAL = """local function server_now()
  local t = redis.call('TIME')"""
_PINNED = """local function server_now()
  local pinned = redis.call('GET', 'fidelity-test:now')
  if pinned then
    return tonumber(pinned)
  end
  local t = redis.call('TIME')"""


# The production scripts, as loaded (before any test swapped them).
_ORIGINALS = {
    (module, name): value
    for module in (redis_module, tiered_module)
    for name, value in vars(module).items()
    if isinstance(value, Script)
}


def clocked(script: Script, edits: Sequence[tuple[str, str]] = ()) -> Script:
    """The same script, reading the pinned test time when there is one.

    `edits` are (old, new) replacements on top, for tests that plant bugs.
    """
    assert _REAL in script.source, "lib.lua's server_now() changed: update tests/redis_clock.py"
    source = script.source.replace(_REAL, _PINNED, 1)
    for old, new in edits:
        source = source.replace(old, new)
    return Script(script.name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


class RedisClock:
    """Pins the time the (patched) scripts see."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2.0)
        self.now = 0.0

    def set(self, now: float) -> None:
        self.now = now
        self.client.set(CLOCK_KEY, repr(now))

    def close(self) -> None:
        self.client.delete(CLOCK_KEY)
        self.client.close()


def patch_scripts(monkeypatch: pytest.MonkeyPatch, edits: Sequence[tuple[str, str]] = ()) -> None:
    """Swap every Script of the store modules for its clocked (and edited) copy."""
    for old, _new in edits:
        assert any(old in value.source for value in _ORIGINALS.values()), old
    for (module, name), original in _ORIGINALS.items():
        monkeypatch.setattr(module, name, clocked(original, edits))


@pytest.fixture
def redis_clock(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisClock]:
    """Scripts on a pinned clock (starts at 1000.0) against the shared, emptied server."""
    patch_scripts(monkeypatch)
    clock = RedisClock(redis_url)
    clock.set(1_000.0)
    try:
        yield clock
    finally:
        clock.close()
