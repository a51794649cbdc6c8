-- admit: the route breaker gate and every rate limit of one request, atomically.
--
-- KEYS: [breaker hash, breaker probes] if ARGV[1] == '1', then one TAT key per limit.
-- ARGV: has_breaker, jitter u in [0,1), n_limits,
--       [10 breaker config values, deferred_epoch, deferred_successes],
--       then per limit: interval_s, tolerance_s, cost, shadow (0/1).
-- Deferred successes (see RedisStore.record) are applied before the gate.
-- Returns: now, verdict, state, epoch, retry_after_s, probe_id, admitted,
--          then per limit: allowed (0/1), remaining, reset_s, retry_after_s.
-- Limits are committed only if the breaker admits and every enforced limit
-- allows; a probe slot taken by the gate is given back when a limit rejects.

local now = server_now()
local has_breaker = ARGV[1] == '1'
local u = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local i = 4
local k = 1
local b = nil
local verdict, state, epoch, wait, probe_id = 'allow', '', 0, 0, 0
if has_breaker then
  local cfg
  cfg, i = read_config(ARGV, i)
  b = br_load(KEYS[1], KEYS[2], cfg)
  br_successes(b, tonumber(ARGV[i]), tonumber(ARGV[i + 1]), now, u)
  i = i + 2
  k = 3
  verdict, state, epoch, wait, probe_id = br_gate(b, now, u)
  if verdict == 'reject' then
    br_save(b)
    return { fmt(now), verdict, state, epoch, fmt(wait), 0, 0 }
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
return out
