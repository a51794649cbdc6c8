-- fleet: one instance announces itself and its load, and reads how many instances
-- share the state and its fraction of their load. A port of
-- fidelity_mw.decide.fleet.FleetTable.announce: keep them in step.
--
-- KEYS[1]: the fleet's sorted set ({prefix}:fleet): member = instance id, score =
--          the server time of its last announcement.
-- KEYS[2]: the fleet's loads ({prefix}:fleet:load, same hash slot): instance id ->
--          "<at> <since> <rate> <prev_since> <prev_rate>": the server times of its
--          last announcement and the one before, its requests per second between
--          them, and the same for the interval before that.
-- ARGV: instance id, member ttl (s), requests it decided since its last announcement
--       (negative: it reports none), hold (s, optional, at least the ttl): members
--       silent for longer than the hold are dropped. A member silent for more than the
--       ttl (cut off from Redis, deciding alone on the share it read) counts until the
--       hold, with the rate it reported last, so the others leave it its part.
-- Returns: {the number of members that count, this one included; this member's
--          fraction of their load ("-1": unknown: one of them reports none, or they
--          have none)}.
--
-- A member's rate is its count over the time since its last announcement (at least
-- 0.1 s), or over the ttl at its first (its previous rate then the same). Its load is
-- kept 10 ttls (or the hold, if longer) after its last announcement, so a member back
-- from a quiet spell has its rate over that spell. Members read their fractions at
-- different times, so the fraction is the lower of two readings (see FleetTable): while
-- the load changes, fractions err low.
-- Both keys expire when no instance has announced for 10 member ttls (or the hold), so
-- a fleet that is gone leaves nothing behind.

local now = server_now()
local ttl = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local id = ARGV[1]
local hold = tonumber(ARGV[4]) or ttl
if hold < ttl then
  hold = ttl
end
local keep = ttl * 10
if hold > keep then
  keep = hold
end
redis.call('ZADD', KEYS[1], fmt(now), id)
-- A member seen after now was seen before the server's clock went back (a step, a
-- failover to a replica whose clock is behind): taken as seen now, or a dead one would
-- stay live for the hold plus the step (FleetTable does the same).
local ahead = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(now), '+inf')
for _, m in ipairs(ahead) do
  redis.call('ZADD', KEYS[1], fmt(now), m)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - hold))
redis.call('PEXPIRE', KEYS[1], ttl_ms(keep))
local size = redis.call('ZCARD', KEYS[1])
if size > 64 then
  -- decide.fleet.LOAD_MAX_MEMBERS: the table is read whole at every announcement, a
  -- cost that grows with the square of the fleet's size; above it no load is kept
  -- (the key expires) and the share is even
  redis.call('HDEL', KEYS[2], id)
  return {size, '-1'}
end

local prev = redis.call('HGET', KEYS[2], id)
if count < 0 then
  redis.call('HDEL', KEYS[2], id)
else
  local at, since, rate = nil, nil, nil
  if prev then
    at, since, rate = string.match(prev, '^(%S+) (%S+) (%S+)')
    at, since, rate = tonumber(at), tonumber(since), tonumber(rate)
  end
  local entry
  if at and since and rate then
    local span = now - at
    if span < 0.1 then
      span = 0.1
    end
    entry = {fmt(now), fmt(at), fmt(count / span), fmt(since), fmt(rate)}
  else -- its first (or an entry that is not ours: as if there were none)
    local first = fmt(count / ttl)
    entry = {fmt(now), fmt(now - ttl), first, fmt(now - 2 * ttl), first}
  end
  redis.call('HSET', KEYS[2], id, table.concat(entry, ' '))
end
redis.call('PEXPIRE', KEYS[2], ttl_ms(keep))

local entries = redis.call('HGETALL', KEYS[2])
local live_after = now - hold
local retain = now - keep
local live = {}
local mine = nil
for i = 1, #entries, 2 do
  local f = {string.match(entries[i + 1], '^(%S+) (%S+) (%S+) (%S+) (%S+)$')}
  for k = 1, 5 do
    f[k] = tonumber(f[k])
  end
  if f[1] and f[2] and f[3] and f[4] and f[5] and f[1] > now then
    -- the clock went back: the entry moves to now, as its member does
    local shift = now - f[1]
    f[1], f[2], f[4] = now, f[2] + shift, f[4] + shift
    redis.call('HSET', KEYS[2], entries[i], table.concat({fmt(f[1]), fmt(f[2]), fmt(f[3]), fmt(f[4]), fmt(f[5])}, ' '))
  end
  if not (f[1] and f[2] and f[3] and f[4] and f[5]) or f[1] < retain then -- (or not ours)
    redis.call('HDEL', KEYS[2], entries[i])
  elseif f[1] > live_after then
    live[#live + 1] = f
    if entries[i] == id then
      mine = f
    end
  end
end
if mine == nil or #live ~= size then
  return {size, '-1'}
end
-- now: the latest rates; then: this member's previous rate against the others' over
-- the intervals nearest that one. The fraction is the lower of the two readings.
local then_mid = (mine[4] + mine[2]) / 2
local total_now = 0
local total_then = 0
for _, f in ipairs(live) do
  total_now = total_now + f[3]
  if f == mine then
    total_then = total_then + f[5]
  elseif math.abs((f[2] + f[1]) / 2 - then_mid) <= math.abs((f[4] + f[2]) / 2 - then_mid) then
    total_then = total_then + f[3]
  else
    total_then = total_then + f[5]
  end
end
if total_now <= 0 or total_then <= 0 then
  return {size, '-1'}
end
return {size, fmt(math.min(mine[3] / total_now, mine[5] / total_then))}
