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

# A limit key's PX (its TAT, refunded seconds, the credit's expiry: often under a second
# in tests) runs on Redis's real milliseconds, which the pinned clock does not move: a
# step that came that much later on a loaded box (a stall, a GC pause) found the key
# gone and the bucket full, and the test failed on what it does not test (rsk46 saw it
# in test_differential). On the pinned clock each limit key lives an hour longer, and
# each write logs the TTL production would have set in the hash TTL_LOG
# (`logged_ttl_ms`), where tests of TTLs read it. `@pytest.mark.real_ttl` keeps the
# production PX for a test that needs it.
TTL_LOG = "fidelity-test:ttl"
LONG_TTL = (
    (
        "local function store_tat(",
        "local function ttl_logged(key, seconds)\n"
        "  local ms = ttl_ms(seconds)\n"
        f"  redis.call('HSET', '{TTL_LOG}', key, ms)\n"
        "  return ms + 3600000\n"
        "end\n\n"
        "local function store_tat(",
    ),
    ("'PX', ttl_ms(", "'PX', ttl_logged(key, "),
)

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

    def logged_ttl_ms(self, key: str) -> int | None:
        """The PX production would have set at the last write of a limit key (LONG_TTL)."""
        ms = self.client.hget(TTL_LOG, key)
        return None if ms is None else int(ms)

    def close(self) -> None:
        self.client.delete(CLOCK_KEY, TTL_LOG)
        self.client.close()


def patch_scripts(monkeypatch: pytest.MonkeyPatch, edits: Sequence[tuple[str, str]] = ()) -> None:
    """Swap every Script of the store modules for its clocked (and edited) copy."""
    for old, _new in edits:
        assert any(old in value.source for value in _ORIGINALS.values()), old
    for (module, name), original in _ORIGINALS.items():
        monkeypatch.setattr(module, name, clocked(original, edits))


@pytest.fixture
def redis_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[RedisClock]:
    """Scripts on a pinned clock (starts at 1000.0) against the shared, emptied server;
    limit keys live an hour longer (LONG_TTL) unless the test is marked `real_ttl`."""
    real_ttl = request.node.get_closest_marker("real_ttl") is not None
    patch_scripts(monkeypatch, () if real_ttl else LONG_TTL)
    clock = RedisClock(redis_url)
    clock.set(1_000.0)
    try:
        yield clock
    finally:
        clock.close()
