-- batch: the admissions and outcome records one process gathered in one event-loop
-- tick, in one call. Each operation is decided exactly as admit.lua / record.lua
-- decide it alone, in the order given, at one server time: the same verdicts as
-- that many separate calls arriving back to back.
--
-- KEYS: every key the operations use, each once (a tick's requests mostly share
--       their keys: one route breaker, one hot limit key).
-- ARGV: one string, the operations joined by ';' (the client's cost is per
--       argument: one for the whole batch), each operation its values joined
--       by ',': 'a' (admission) or 'r' (record), then 'k' followed by the KEYS
--       indices of the operation's own keys joined by '.' (an admission:
--       [breaker hash, breaker probes] if it has a breaker, then one TAT key per
--       limit; a record: breaker hash, breaker probes), then admit.lua's or
--       record.lua's ARGV.
-- Returns: one string: per operation what admit.lua / record.lua return, values
--          joined by ',', operations by ';' (one bulk reply parses cheaply). An
--          operation that raised (a key holding a value that is not ours: WRONGTYPE)
--          is '!' and the error's text instead: alone it would have failed its own
--          call, so it fails alone here too; the others are decided as they would be.

local now = server_now()

local replies = {}
local j = 0
for op in string.gmatch(ARGV[1], '[^;]+') do
  j = j + 1
  local values = {}
  for v in string.gmatch(op, '[^,]+') do
    values[#values + 1] = v
  end
  local keys = {}
  for x in string.gmatch(values[2], '%d+') do
    keys[#keys + 1] = KEYS[tonumber(x)]
  end
  local ok, reply
  if values[1] == 'a' then
    ok, reply = pcall(admit_at, values, 3, keys, now)
  elseif values[1] == 'r' then
    ok, reply = pcall(record_at, values, 3, keys, now)
  else
    return redis.error_reply('batch: unknown operation ' .. tostring(values[1]))
  end
  if ok then
    for i = 1, #reply do
      reply[i] = tostring(reply[i])
    end
    replies[j] = table.concat(reply, ',')
  else -- (an operation reads its keys before it writes: a key of another type fails it unchanged)
    local text = type(reply) == 'table' and reply.err or tostring(reply)
    replies[j] = '!' .. (string.gsub(tostring(text), '[,;]', ' '))
  end
end
return table.concat(replies, ';')
