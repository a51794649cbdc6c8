-- peek: would a request with these limits be admitted now? Check without counting
-- (limits' test()): each limit decided as admit_at decides it (gcra, then the key's
-- retry credit), and nothing written. Port of fidelity_mw.decide.gcra.peek.
--
-- KEYS: one TAT key per limit. ARGV: per limit: interval_s, tolerance_s, cost.
-- Returns: now, then per limit: code (1 allowed, 2 allowed from retry credit,
-- 0 refused), remaining, reset_s, retry_after_s; remaining and reset_s describe
-- the bucket as it is (not as the request would leave it).

local now = server_now()
local out = { fmt(now) }
local i = 1
for _, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local tol = tonumber(ARGV[i + 1])
  local cost = tonumber(ARGV[i + 2])
  i = i + 3
  local stored, _, credit, expires, wrote = tat_of(key, now)
  local allowed, _, remaining, reset, retry = gcra(stored, now, interval, tol, cost, wrote)
  local code = 0
  if allowed then
    code = 1
    local _, _, r0, reset0 = gcra(stored, now, interval, tol, 0, wrote)
    remaining, reset = r0, reset0
  elseif credit > 0 and spend_credit(credit, expires, now, interval, cost) then
    code, retry = 2, 0
  end
  out[#out + 1] = code
  out[#out + 1] = remaining
  out[#out + 1] = fmt(reset)
  out[#out + 1] = fmt(retry)
end
return out
