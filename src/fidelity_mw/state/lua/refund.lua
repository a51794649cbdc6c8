-- refund: give back the units an admitted request took, because another control
-- layer then shed it (a request rejected by one layer consumes no quota of another).
--
-- KEYS: one TAT key per limit. ARGV: per limit: interval_s, cost, admitted_tat
-- (the TAT the admission stored, on this server's clock; negative: unknown),
-- tolerance_s, credit_s (how long retry credit lasts; 0: none).
-- Port of fidelity_mw.decide.gcra.refund_seconds: admitted_tat is the marker the
-- admission reported (its TAT plus the key's refunded seconds then); the
-- request's units are outstanding only until admitted_tat - refunded (the
-- bucket refills in order and every refund since moved them forward), so at
-- most that minus now comes back, never more than cost * interval. The key
-- keeps the refunded seconds (lib.lua store_tat) until tat + refunded is past.
-- With credit_s > 0 the request's cost also becomes retry credit (earn_credit),
-- which keeps the key until it expires.
-- Returns: now.

local now = server_now()
local i = 1
for _, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local cost = tonumber(ARGV[i + 1])
  local admitted = tonumber(ARGV[i + 2])
  local tol = tonumber(ARGV[i + 3])
  local window = tonumber(ARGV[i + 4])
  i = i + 5
  local tat, refunded, credit, expires, wrote = tat_of(key, now)
  local give = refund_seconds(admitted, now, interval, cost, refunded)
  local changed = false
  if give > 0 then
    tat = tat - give
    refunded = refunded + give
    changed = true
  end
  if window > 0 then
    local earned, until_ = earn_credit(credit, expires, cost * interval, now, interval, tol,
      window)
    if earned ~= credit or until_ ~= expires then
      credit, expires, changed = earned, until_, true
    end
  end
  if changed then
    if tat + refunded - now > slack_of(now, interval, tol) or credit > 0 then
      store_tat(key, tat, now, refunded, credit, expires, wrote)
    else
      redis.call('DEL', key)
    end
  end
end
return fmt(now)
