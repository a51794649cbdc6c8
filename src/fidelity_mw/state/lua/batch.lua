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

-- One admission: its values in ARGV from `a`, KEYS from `k`. Returns reply, next k.
local function admit_at(ARGV, a, k)
  local has_breaker = ARGV[a] == '1'
  local u = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  local i = a + 3
  local b = nil
  local verdict, state, epoch, wait, probe_id = 'allow', '', 0, 0, 0
  if has_breaker then
    local cfg
    cfg, i = read_config(ARGV, i)
    b = br_load(KEYS[k], KEYS[k + 1], cfg)
    br_successes(b, tonumber(ARGV[i]), tonumber(ARGV[i + 1]), now, u)
    i = i + 2
    k = k + 2
    verdict, state, epoch, wait, probe_id = br_gate(b, now, u)
    if verdict == 'reject' then
      br_save(b)
      return { fmt(now), verdict, state, epoch, fmt(wait), 0, 0 }, k + n
    end
  end
  local out = { fmt(now), verdict, state, epoch, fmt(wait), probe_id, 1 }
  local admitted = true
  local commits = {}
  for j = 0, n - 1 do
    local key = KEYS[k + j]
    local interval = tonumber(ARGV[i])
    local tol = tonumber(ARGV[i + 1])
    local cost = tonumber(ARGV[i + 2])
    local shadow = ARGV[i + 3] == '1'
    i = i + 4
    local allowed, tat, remaining, reset, retry = gcra(tat_of(key, now), now, interval, tol, cost)
    if allowed then
      commits[#commits + 1] = { key, tat }
    elseif not shadow then
      admitted = false
    end
    out[#out + 1] = allowed and 1 or 0
    out[#out + 1] = remaining
    out[#out + 1] = fmt(reset)
    out[#out + 1] = fmt(retry)
  end
  if admitted then
    for _, c in ipairs(commits) do
      store_tat(c[1], c[2], now)
    end
  else
    out[7] = 0
    if b ~= nil and probe_id ~= 0 then
      br_record(b, epoch, probe_id, 'i', false, now, u)
    end
  end
  if b ~= nil then
    br_save(b)
  end
  return out, k + n
end

-- One outcome record: its values in ARGV from `a`, KEYS from `k`. Returns reply, next k.
local function record_at(ARGV, a, k)
  local u = tonumber(ARGV[a])
  local epoch = tonumber(ARGV[a + 1])
  local probe_id = tonumber(ARGV[a + 2])
  local outcome = ARGV[a + 3]
  local slow = ARGV[a + 4] == '1'
  local cfg = read_config(ARGV, a + 7)
  local b = br_load(KEYS[k], KEYS[k + 1], cfg)
  br_successes(b, tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), now, u)
  local state = br_record(b, epoch, probe_id, outcome, slow, now, u)
  br_save(b)
  return { state, b.ep }, k + 2
end

local replies = {}
local k = 1
for j = 1, #ARGV do
  local values = {}
  for v in string.gmatch(ARGV[j], '[^,]+') do
    values[#values + 1] = v
  end
  local reply
  if values[1] == 'a' then
    reply, k = admit_at(values, 2, k)
  elseif values[1] == 'r' then
    reply, k = record_at(values, 2, k)
  else
    return redis.error_reply('batch: unknown operation ' .. tostring(values[1]))
  end
  for i = 1, #reply do
    reply[i] = tostring(reply[i])
  end
  replies[j] = table.concat(reply, ',')
end
return table.concat(replies, ';')
