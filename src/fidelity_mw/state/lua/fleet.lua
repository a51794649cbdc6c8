-- fleet: one instance announces itself and reads how many instances share the state.
--
-- KEYS: the fleet's sorted set ({prefix}:fleet): member = instance id, score = the
--       server time of its last announcement.
-- ARGV: instance id, member ttl (s): members silent for longer are dropped.
-- Returns: the number of live members, this one included.
--
-- The key expires when no instance has announced for 10 member ttls, so a
-- fleet that is gone leaves nothing behind.

local now = server_now()
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], fmt(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - ttl))
redis.call('PEXPIRE', KEYS[1], ttl_ms(ttl * 10))
return redis.call('ZCARD', KEYS[1])
