-- batch: the admissions and outcome records one process gathered in one event-loop
-- tick, in one call. Each operation is decided exactly as admit.lua / record.lua
-- decide it alone, in the order given, at one server time: the same verdicts as
-- that many separate calls arriving back to back.
--
-- KEYS: each operation's keys, in order (an admission: [breaker hash, breaker
--       probes] if it has a breaker, then one TAT key per limit; a record:
--       breaker hash, breaker probes).
-- ARGV: one string per operation: its values joined by ',' (one argument each
--       costs the client far more than one string): either 'a' followed by
--       admit.lua's ARGV, or 'r' followed by record.lua's ARGV (17 values).
-- Returns: one string: per operation what admit.lua / record.lua return, values
--          joined by ',', operations by ';' (one bulk reply parses cheaply).

local now = server_now()

local replies = {}
local k = 1
for j = 1, #ARGV do
  local values = {}
  for v in string.gmatch(ARGV[j], '[^,]+') do
    values[#values + 1] = v
  end
  local reply
  if values[1] == 'a' then
    reply, k = admit_at(values, 2, k, now)
  elseif values[1] == 'r' then
    reply, k = record_at(values, 2, k, now)
  else
    return redis.error_reply('batch: unknown operation ' .. tostring(values[1]))
  end
  for i = 1, #reply do
    reply[i] = tostring(reply[i])
  end
  replies[j] = table.concat(reply, ',')
end
return table.concat(replies, ';')
