-- refund: give back the units an admitted request took, because another control
-- layer then shed it (a request rejected by one layer consumes no quota of another).
--
-- KEYS: one TAT key per limit. ARGV: per limit: interval_s, cost, admitted_tat
-- (the TAT the admission stored, on this server's clock; negative: unknown).
-- Port of fidelity_mw.decide.gcra.refund: admitted_tat is the marker the
-- admission reported (its TAT plus the key's refunded seconds then); the
-- request's units are outstanding only until admitted_tat - refunded (the
-- bucket refills in order and every refund since moved them forward), so at
-- most that minus now comes back, never more than cost * interval. The key
-- keeps the refunded seconds (lib.lua store_tat) until tat + refunded is past.
-- Returns: now.

local now = server_now()
local i = 1
for _, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local cost = tonumber(ARGV[i + 1])
  local admitted = tonumber(ARGV[i + 2])
  i = i + 3
  local tat, refunded = tat_of(key, now)
  local give = cost * interval
  if admitted >= 0 then
    local outstanding = admitted - refunded - now
    if outstanding < 0 then
      outstanding = 0
    end
    if outstanding < give then
      give = outstanding
    end
  end
  if give > 0 then
    local back = tat - give
    refunded = refunded + give
    if back + refunded - now > SLACK * interval then
      store_tat(key, back, now, refunded)
    else
      redis.call('DEL', key)
    end
  end
end
return fmt(now)
