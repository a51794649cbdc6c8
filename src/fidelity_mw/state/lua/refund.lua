-- refund: give back the units an admitted request took, because another control
-- layer then shed it (a request rejected by one layer consumes no quota of another).
--
-- KEYS: one TAT key per limit. ARGV: per limit: interval_s, cost.
-- Moving the TAT back by cost * interval returns exactly those units; a TAT
-- that falls to now or earlier is a full bucket, the same as no key at all.
-- Returns: now.

local now = server_now()
local i = 1
for _, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local cost = tonumber(ARGV[i + 1])
  i = i + 2
  local back = tat_of(key, now) - cost * interval
  if back > now then
    store_tat(key, back, now)
  else
    redis.call('DEL', key)
  end
end
return fmt(now)
