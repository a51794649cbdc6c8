-- outbound: one call before an outbound attempt: the host breaker gate and the
-- upstream's retry budget, atomically.
--
-- Budgets port fidelity_mw.decide.budget.BudgetWindow: a ring of 10 buckets over
-- budget_window_s; a retry is allowed while
--   retries + 1 <= budget_ratio * requests + budget_min_per_s * window_s.
--
-- KEYS: [breaker hash, breaker probes] if ARGV[1] == '1', then one key per budget.
-- ARGV: has_breaker, jitter u, n_budgets,
--       [10 breaker config values, deferred_epoch, deferred_successes, probe_id
--       (chosen by the caller, 0: the breaker's counter; see admit.lua)],
--       then per budget: window_s, ratio, min_per_s, add_requests, want_retry (0/1).
-- Order: requests are counted first (they are facts); a wanted retry the
-- budget denies takes no breaker gate (no probe slot); a breaker rejection
-- spends no retry.
-- Returns: now, verdict, state, epoch, retry_after_s, probe_id,
--          then per budget: allowed (0/1), requests, retries.

local EPSILON = 1e-9

local function bu_load(key, window_s)
  local v = redis.call('HMGET', key, 'be', 'ix', 'rq', 'rt')
  local w = {
    key = key, window_s = window_s, bs = window_s / BUCKETS,
    be = tonumber(v[1]) or 0, ix = tonumber(v[2]) or 0, rq = {}, rt = {},
  }
  if v[3] then
    for n in string.gmatch(v[3], '[^,]+') do w.rq[#w.rq + 1] = tonumber(n) end
  end
  if v[4] then
    for n in string.gmatch(v[4], '[^,]+') do w.rt[#w.rt + 1] = tonumber(n) end
  end
  if #w.rq ~= BUCKETS or #w.rt ~= BUCKETS then
    for j = 1, BUCKETS do
      w.rq[j] = 0
      w.rt[j] = 0
    end
  end
  return w
end

local function bu_rotate(w, now)
  if now < w.be then
    if w.be - now > 2 * w.bs then
      -- set before TIME went back (decide.budget.BudgetWindow._rotate)
      w.be = now + w.bs
      w.dirty = true
    end
    return
  end
  if w.be == 0 then
    w.be = now + w.bs
    return
  end
  local steps = buckets_passed(now, w.be, w.bs)
  if steps >= BUCKETS then
    for j = 1, BUCKETS do
      w.rq[j] = 0
      w.rt[j] = 0
    end
    w.ix = 0
  else
    for _ = 1, steps do
      w.ix = (w.ix + 1) % BUCKETS
      w.rq[w.ix + 1] = 0
      w.rt[w.ix + 1] = 0
    end
  end
  w.be = w.be + steps * w.bs
end

local function bu_totals(w)
  local rq, rt = 0, 0
  for j = 1, BUCKETS do
    rq = rq + w.rq[j]
    rt = rt + w.rt[j]
  end
  return rq, rt
end

local function bu_save(w)
  redis.call('HSET', w.key, 'be', fmt(w.be), 'ix', w.ix,
    'rq', table.concat(w.rq, ','), 'rt', table.concat(w.rt, ','))
  redis.call('PEXPIRE', w.key, ttl_ms(2 * w.window_s + 60))
end

local now = server_now()
local has_breaker = ARGV[1] == '1'
local u = tonumber(ARGV[2])
local nb = tonumber(ARGV[3])
local i = 4
local k = 1
local cfg = nil
local deferred_epoch, deferred = 0, 0
local pid = '0'
if has_breaker then
  cfg, i = read_config(ARGV, i)
  deferred_epoch, deferred = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  pid = ARGV[i + 2]
  i = i + 3
  k = 3
end
local budgets = {}
local denied = false
for j = 0, nb - 1 do
  local w = bu_load(KEYS[k + j], tonumber(ARGV[i]))
  w.ratio = tonumber(ARGV[i + 1])
  w.floor = tonumber(ARGV[i + 2])
  local add = tonumber(ARGV[i + 3])
  w.want = ARGV[i + 4] == '1'
  i = i + 5
  bu_rotate(w, now)
  if add > 0 then
    w.rq[w.ix + 1] = w.rq[w.ix + 1] + add
    w.dirty = true
  end
  w.allowed = true
  if w.want then
    local rq, rt = bu_totals(w)
    w.allowed = rt + 1 <= w.ratio * rq + w.floor * w.window_s + EPSILON
    if not w.allowed then
      denied = true
    end
  end
  budgets[#budgets + 1] = w
end
local verdict, state, epoch, wait, probe_id = 'allow', '', 0, 0, 0
if has_breaker then
  local b = br_load(KEYS[1], KEYS[2], cfg)
  br_successes(b, deferred_epoch, deferred, now, u)
  if not denied then
    verdict, state, epoch, wait, probe_id = br_gate(b, now, u, pid)
  end
  br_save(b)
end
local out = { fmt(now), verdict, state, epoch, fmt(wait), probe_id }
for _, w in ipairs(budgets) do
  local allowed = w.allowed and not denied and verdict ~= 'reject'
  if w.want and allowed then
    w.rt[w.ix + 1] = w.rt[w.ix + 1] + 1
    w.dirty = true
  end
  if w.dirty or w.want then
    bu_save(w)
  end
  local rq, rt = bu_totals(w)
  out[#out + 1] = w.allowed and 1 or 0
  out[#out + 1] = rq
  out[#out + 1] = rt
end
return out
