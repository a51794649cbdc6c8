-- record: report how one admitted call ended to a breaker.
--
-- KEYS: breaker hash, breaker probes.
-- ARGV: jitter u, epoch, probe_id, outcome ('s' | 'f' | 'i'), slow (0/1),
--       deferred_epoch, deferred_successes, [10 config values].
-- Deferred successes (see RedisStore.record) are applied first.
-- Returns: the state afterwards, the epoch afterwards.

local now = server_now()
local u = tonumber(ARGV[1])
local epoch = tonumber(ARGV[2])
local probe_id = tonumber(ARGV[3])
local outcome = ARGV[4]
local slow = ARGV[5] == '1'
local cfg = read_config(ARGV, 8)
local b = br_load(KEYS[1], KEYS[2], cfg)
br_successes(b, tonumber(ARGV[6]), tonumber(ARGV[7]), now, u)
local state = br_record(b, epoch, probe_id, outcome, slow, now, u)
br_save(b)
return { state, b.ep }
