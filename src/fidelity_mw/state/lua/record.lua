-- record: report how one admitted call ended to a breaker.
--
-- KEYS: breaker hash, breaker probes.
-- ARGV: jitter u, epoch (-1 with a probe_id: the probe's own), probe_id,
--       outcome ('s' | 'f' | 'i' | 'b'), slow (0/1),
--       deferred_epoch, deferred_successes, [10 config values].
-- Deferred successes (see RedisStore.record) are applied first.
-- Returns: the state afterwards, the epoch afterwards.

-- The work is lib.lua's record_at, shared with batch.lua.

local out = record_at(ARGV, 1, KEYS, server_now())
return out
