-- refund: give back the units an admitted request took, because another control
-- layer then shed it (a request rejected by one layer consumes no quota of another).
--
-- KEYS: one TAT key per limit. ARGV: per limit: interval_s, cost, admitted_tat
-- (the TAT the admission stored, on this server's clock; negative: unknown).
-- Port of fidelity_mw.decide.gcra.refund: the request's units are outstanding
-- only until admitted_tat (the bucket refills in order), so at most
-- admitted_tat - now seconds come back, never more than cost * interval.
-- A TAT that falls to now or earlier is a full bucket, the same as no key.
-- Returns: now.

local now = server_now()
local i = 1
for _, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local cost = tonumber(ARGV[i + 1])
  local admitted = tonumber(ARGV[i + 2])
  i = i + 3
  local give = cost * interval
  if admitted >= 0 then
    local outstanding = admitted - now
    if outstanding < 0 then
      outstanding = 0
    end
    if outstanding < give then
      give = outstanding
    end
  end
  if give > 0 then
    local back = tat_of(key, now) - give
    if back - now > SLACK * interval then
      store_tat(key, back, now)
    else
      redis.call('DEL', key)
    end
  end
end
return fmt(now)
