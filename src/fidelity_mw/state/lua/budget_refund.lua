-- budget_refund: give back one retry that outbound.lua spent and whose attempt was
-- then not sent (the call was cancelled during its backoff, or its deadline passed
-- first). Port of fidelity_mw.decide.budget.BudgetWindow.refund.
--
-- KEYS: the budget hash (outbound.lua's: be = the current bucket's end, ix = its index,
--       rt = the retries per bucket).
-- ARGV: window_s, age_s (how long ago the retry was spent, on the caller's clock)
--       [, spent_at: the server time outbound.lua spent it at (its reply's first value)].
-- The retry comes off the bucket it was counted in: the one spent_at is in, or without
-- it, the one age_s back from now on the server's clock (an age measured on another
-- clock, off by the round trips: at a bucket's edge it can name the next one), while
-- that bucket is still in the window and holds one; the ring is
-- read as it stands, not rotated (the next outbound.lua call rotates it), and the key
-- keeps the expiry its last count gave it.
-- Returns: 1 if a retry was given back, else 0.

local key = KEYS[1]
local bs = tonumber(ARGV[1]) / BUCKETS
local now = server_now()
local v = redis.call('HMGET', key, 'be', 'ix', 'rt')
local be = tonumber(v[1]) or 0
-- decide.budget.BOUND_SLACK (2^-48 of the end): an instant a few ulps before a bound
-- stepped back to is the later bucket's
local spent = (tonumber(ARGV[3]) or (now - tonumber(ARGV[2]))) + be * 3.552713678800501e-15
local ix = tonumber(v[2]) or 0
if be == 0 or spent >= be or not v[3] then
  return 0
end
local rt = {}
for n in string.gmatch(v[3], '[^,]+') do
  rt[#rt + 1] = tonumber(n)
end
if #rt ~= BUCKETS then
  return 0
end
-- port of decide.budget.buckets_back: the bucket `spent` fell in, checked against its bounds
local back = math.floor((be - spent) / bs)
if be - back * bs <= spent then
  back = back - 1
elseif be - (back + 1) * bs > spent then
  back = back + 1
end
local passed = 0
if now >= be then
  passed = buckets_passed(now, be, bs)
end
if back < 0 or back + passed >= BUCKETS then
  return 0
end
local j = (ix - back) % BUCKETS + 1
if rt[j] <= 0 then
  return 0
end
rt[j] = rt[j] - 1
redis.call('HSET', key, 'rt', table.concat(rt, ','))
return 1
