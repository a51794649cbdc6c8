-- fleet: one instance announces itself and its load, and reads how many instances
-- share the state and its fraction of their load. A port of
-- fidelity_mw.decide.fleet.FleetTable.announce: keep them in step.
--
-- KEYS[1]: the fleet's sorted set ({prefix}:fleet): member = instance id, score =
--          the server time of its last announcement.
-- KEYS[2]: the fleet's loads ({prefix}:fleet:load, same hash slot): instance id ->
--          "<time of its last announcement> <requests per second before it> <the
--          same over the interval before that>".
-- ARGV: instance id, member ttl (s): members silent for longer are dropped,
--       requests it decided since its last announcement (negative: it reports none).
-- Returns: {the number of live members, this one included; this member's fraction
--          of the live members' load ("-1": unknown: a live member reports none, or
--          none has any)}.
--
-- A member's rate is its count over the time since its last announcement (at least
-- 0.1 s), or over the ttl at its first (its previous rate then the same). Its load is kept 10 ttls after its last
-- announcement, so a member back from a quiet spell has its rate over that spell.
-- Both keys expire when no instance has announced for 10 member ttls, so a fleet
-- that is gone leaves nothing behind.

local now = server_now()
local ttl = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local id = ARGV[1]
redis.call('ZADD', KEYS[1], fmt(now), id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - ttl))
redis.call('PEXPIRE', KEYS[1], ttl_ms(ttl * 10))
local size = redis.call('ZCARD', KEYS[1])

local prev = redis.call('HGET', KEYS[2], id)
if count < 0 then
  redis.call('HDEL', KEYS[2], id)
else
  local rate = count / ttl
  local prev_rate = rate
  local at, last = nil, nil
  if prev then
    at, last = string.match(prev, '^(%S+) (%S+)')
    at, last = tonumber(at), tonumber(last)
  end
  if at and last then -- (an entry that is not ours: as if there were none)
    local span = now - at
    if span < 0.1 then
      span = 0.1
    end
    rate = count / span
    prev_rate = last
  end
  redis.call('HSET', KEYS[2], id, fmt(now) .. ' ' .. fmt(rate) .. ' ' .. fmt(prev_rate))
end
redis.call('PEXPIRE', KEYS[2], ttl_ms(ttl * 10))

-- this member's fraction: the lower of its last two rates against the higher of
-- each other live member's (while the load changes, fractions err low, never high)
local entries = redis.call('HGETALL', KEYS[2])
local live_after = now - ttl
local retain = now - ttl * 10
local total = 0
local live = 0
local mine = nil
for i = 1, #entries, 2 do
  local at, rate, prev_rate = string.match(entries[i + 1], '^(%S+) (%S+) (%S+)$')
  at = tonumber(at)
  rate = tonumber(rate)
  prev_rate = tonumber(prev_rate)
  if not (at and rate and prev_rate) or at < retain then -- (or not ours)
    redis.call('HDEL', KEYS[2], entries[i])
  elseif at > live_after then
    live = live + 1
    if entries[i] == id then
      mine = math.min(rate, prev_rate)
      total = total + mine
    else
      total = total + math.max(rate, prev_rate)
    end
  end
end
if mine == nil or live ~= size or total <= 0 then
  return {size, '-1'}
end
return {size, fmt(mine / total)}
