-- fidelity_mw shared Lua library. The loader prepends this file to every
-- entry script (admit.lua, record.lua, sync.lua, budget.lua), so each script
-- is self-contained for EVALSHA. Ports of fidelity_mw.decide.gcra.gcra and
-- fidelity_mw.decide.breaker.BreakerState: keep them in step with the Python.
--
-- Time is the server's TIME (seconds, float): one clock for the whole fleet.
-- Floats cross the wire as strings ("%.17g"): a Lua number returned to
-- Redis is truncated to an integer.

local SLACK = 1e-6
local HALF_ULP = 2 ^ -53
local BUCKETS = 10

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.17g', x)
end

local function ttl_ms(seconds)
  local ms = math.ceil(seconds * 1000)
  if ms < 1 then
    ms = 1
  end
  return ms
end

-- ------------------------------------------------------------------ GCRA

-- fidelity_mw.decide.gcra.slack_s: a millionth of an interval plus half an ulp
-- of now (TIME is about 1.8e9 s, one ulp about 2.4e-7 s) per unit of the burst
-- and 32 more, at most half an interval
local function slack_of(now, interval, tol)
  local slack = SLACK * interval + math.abs(now) * HALF_ULP * (tol / interval + 32)
  local half = 0.5 * interval
  if slack < half then
    return slack
  end
  return half
end

-- base + seconds, but never base itself for a charge (seconds > 0): a charge under half
-- an ulp of the clock (an interval under 1.2e-7 s on Unix time: past 8.4e6/s) rounds
-- back to base, and nothing would ever be charged; one ulp instead (gcra.py: nextafter)
local function charged(base, seconds)
  local t = base + seconds
  if t <= base and seconds > 0 and base > 0 then
    local _, e = math.frexp(base)
    t = base + 2 ^ (e - 53)
  end
  return t
end

-- fidelity_mw.decide.gcra.CLOCK_STEP_S: a stored TAT further than this past a full burst
-- ahead of now was stored before TIME went back (a failover to a replica whose clock is
-- behind, an NTP step): it reads as an empty bucket, so the key refuses for at most one
-- burst's refill time rather than for as long as the clock was wrong
local CLOCK_STEP_S = 120.0
-- fidelity_mw.decide.gcra.recorded: a write that leaves the TAT more than CLOCK_STEP_S
-- ahead records how far (a policy with a larger burst, mid-rollout, left a debt that is
-- no clock step); at most that, no reader can mistake it
local function recorded(ahead)
  if ahead > CLOCK_STEP_S then
    return ahead
  end
  return 0
end

-- `wrote`: how far ahead the key's TAT was written, as the key records it (0: none)
local function unstep(tat, now, tol, wrote)
  local most = tol
  if wrote and wrote > tol then
    most = wrote
  end
  if tat - now > most + CLOCK_STEP_S then
    return now + tol
  end
  return tat
end

-- returns allowed, tat_to_store, remaining, reset_s, retry_after_s
local function gcra(tat, now, interval, tol, cost, wrote)
  local base = now
  if tat > now then
    tat = unstep(tat, now, tol, wrote)
    base = tat
  end
  local new_tat = charged(base, cost * interval)
  local allow_at = new_tat - tol
  local slack = slack_of(now, interval, tol)
  if allow_at - now > slack then
    local remaining = math.floor((tol - (base - now) + slack) / interval)
    if remaining < 0 then
      remaining = 0
    end
    return false, tat, remaining, base - now, allow_at - now
  end
  local remaining = math.floor((tol - (new_tat - now) + slack) / interval)
  if remaining < 0 then
    remaining = 0
  end
  return true, new_tat, remaining, new_tat - now, 0
end

-- A TAT key holds "tat", or "tat refunded" once the key had a refund (the
-- seconds refunded so far, see fidelity_mw.decide.gcra.refund and marker), or
-- "tat refunded credit expires" while it holds retry credit (seconds, and when
-- they expire: fidelity_mw.decide.gcra.earn_credit), or "tat refunded credit
-- expires wrote" when the write of the TAT left it more than CLOCK_STEP_S ahead,
-- `wrote` that far (`recorded`). A key of the version before `wrote` reads as
-- recording none: the reader's own tolerance, as that version read every key; that
-- version reads the first four fields of ours and leaves `wrote` out when it writes.
-- Returns tat, refunded, credit, expires (credit 0 once expired), wrote.
local function tat_of(key, now)
  local v = redis.call('GET', key)
  if v then
    local tat = tonumber(v)
    if tat then -- never refunded: the common case, one conversion
      return tat, 0, 0, 0, 0
    end
    local f = {}
    for x in string.gmatch(v, '[^ ]+') do
      f[#f + 1] = tonumber(x)
    end
    local credit, expires = f[3] or 0, f[4] or 0
    if expires <= now then
      credit, expires = 0, 0
    end
    return f[1] or now, f[2] or 0, credit, expires, f[5] or 0
  end
  return now, 0, 0, 0, 0
end

-- A refunded key lives until its virtual TAT (tat + refunded) is past: until
-- then a refund of any request it admitted needs the refunded seconds. Credit
-- keeps it until the credit expires too.
local function store_tat(key, tat, now, refunded, credit, expires, wrote)
  if wrote and wrote > 0 then
    local keep = tat + refunded
    if credit > 0 and expires > keep then
      keep = expires
    end
    if credit <= 0 then
      credit, expires = 0, 0
    end
    redis.call('SET', key, fmt(tat) .. ' ' .. fmt(refunded) .. ' ' .. fmt(credit) .. ' ' ..
      fmt(expires) .. ' ' .. fmt(wrote), 'PX', ttl_ms(keep - now))
  elseif credit and credit > 0 then
    local keep = tat + refunded
    if expires > keep then
      keep = expires
    end
    redis.call('SET', key, fmt(tat) .. ' ' .. fmt(refunded) .. ' ' .. fmt(credit) .. ' ' ..
      fmt(expires), 'PX', ttl_ms(keep - now))
  elseif refunded and refunded > 0 then
    redis.call('SET', key, fmt(tat) .. ' ' .. fmt(refunded), 'PX', ttl_ms(tat + refunded - now))
  else
    redis.call('SET', key, fmt(tat), 'PX', ttl_ms(tat - now))
  end
end

-- Ports of fidelity_mw.decide.gcra.refund_seconds, earn_credit and spend_credit.
local function refund_seconds(admitted, now, interval, cost, refunded)
  local give = cost * interval
  if admitted >= 0 then -- negative: admission unknown, give back everything
    local outstanding = admitted - refunded - now
    if outstanding < 0 then
      outstanding = 0
    end
    if outstanding < give then
      give = outstanding
    end
  end
  return give
end

local function earn_credit(credit, expires, units, now, interval, tol, window)
  if window <= 0 or units <= SLACK * interval then
    return credit, expires
  end
  if expires <= now then
    credit = 0
  end
  credit = credit + units
  if credit > tol then
    credit = tol
  end
  return credit, now + window
end

-- returns the credit left, or nil
local function spend_credit(credit, expires, now, interval, cost)
  local need = cost * interval
  if expires <= now or credit - need < -SLACK * interval then
    return nil
  end
  local left = credit - need
  if left > SLACK * interval then
    return left
  end
  return 0
end

-- ------------------------------------------------------------------ breaker

-- Breaker config as it travels in ARGV (10 values, see breaker_args in redis.py):
-- failure_ratio, min_calls, window_s, open_s, open_jitter, half_open_probes,
-- probe_lease_s, slow_call_ratio (-1: off), consecutive_failures (0: off), open_min_s
local function read_config(argv, i)
  local c = {
    failure_ratio = tonumber(argv[i]),
    min_calls = tonumber(argv[i + 1]),
    window_s = tonumber(argv[i + 2]),
    open_s = tonumber(argv[i + 3]),
    open_jitter = tonumber(argv[i + 4]),
    probes = tonumber(argv[i + 5]),
    lease = tonumber(argv[i + 6]),
    slow_ratio = tonumber(argv[i + 7]),
    consecutive = tonumber(argv[i + 8]),
    open_min = tonumber(argv[i + 9]),
  }
  c.bucket_s = c.window_s / BUCKETS
  -- Keep the state long enough that no live call can outlast it (its epoch
  -- must still mean something when it reports), at least an hour.
  local keep = 2 * (c.window_s + c.open_s * (1 + c.open_jitter) + c.lease)
  if keep < 3600 then
    keep = 3600
  end
  c.keep_ms = ttl_ms(keep)
  return c, i + 10
end

-- er: the failure streak the last success ended (BreakerState.erased), written as
-- "streak calls be": the window's calls and bucket end it was saved with. A process of
-- the version before `er` (an upgrade mid-fleet) writes co, be and w and leaves er as it
-- was; any outcome it records changes the window's calls or its bucket end, so an `er`
-- that no longer matches them is a streak that process's success ended already: 0.
-- pc: the probe whose success closed the breaker (BreakerState.closed_by)
-- cr: when a tiered sync brought the streak `co` to consecutive_failures (0: none;
-- decide.breaker.streak_stands); the versions before it neither read nor write it
local FIELDS = { 'st', 'ep', 'ou', 'oa', 'co', 'be', 'np', 'w', 'ro', 'er', 'pc', 'cr' }

local function br_calls(w)
  local calls = 0
  for j = 1, 3 * BUCKETS, 3 do
    calls = calls + w[j]
  end
  return calls
end

local function br_erased(text, be, w)
  if not text then
    return 0
  end
  local n, calls, at = string.match(text, '^(%d+) (%d+) (%S+)$')
  if n == nil or at ~= be or tonumber(calls) ~= br_calls(w) then
    return 0
  end
  return tonumber(n)
end

local function br_erased_text(b)
  if b.er == 0 then
    return '0'
  end
  return b.er .. ' ' .. br_calls(b.w) .. ' ' .. fmt(b.be)
end

local function br_load(hkey, pkey, cfg)
  local v = redis.call('HMGET', hkey, unpack(FIELDS))
  local b = {
    hkey = hkey,
    pkey = pkey,
    cfg = cfg,
    st = v[1] or 'closed',
    ep = tonumber(v[2]) or 0,
    ou = tonumber(v[3]) or 0,
    oa = tonumber(v[4]) or 0,
    co = tonumber(v[5]) or 0,
    be = tonumber(v[6]) or 0,
    np = tonumber(v[7]) or 1,
    ro = tonumber(v[9]) or 0,
    pc = v[11] or '0', -- (a probe id: a string, as the callers send it)
    cr = tonumber(v[12]) or 0,
    defer = false, -- a tiered sync's streak opens through streak_stands, not at once
    w = {},
    dirty = false,
    full = false,
  }
  if v[8] then
    for n in string.gmatch(v[8], '[^,]+') do
      b.w[#b.w + 1] = tonumber(n)
    end
  end
  if #b.w ~= 3 * BUCKETS then
    b.w = {}
    for j = 1, 3 * BUCKETS do
      b.w[j] = 0
    end
  end
  b.er = br_erased(v[10], v[6] or fmt(0), b.w)
  return b
end

-- b.dirty: the window changed (co, be, w); b.full: anything else changed too
-- (a transition or a probe id), so every field is written.
local function br_save(b)
  if not b.dirty and not b.full then
    return
  end
  if b.full then
    redis.call('HSET', b.hkey,
      'st', b.st, 'ep', b.ep, 'ou', fmt(b.ou), 'oa', fmt(b.oa), 'co', b.co,
      'be', fmt(b.be), 'np', b.np, 'w', table.concat(b.w, ','), 'ro', b.ro, 'er',
      br_erased_text(b), 'pc', b.pc, 'cr', fmt(b.cr))
    if redis.call('EXISTS', b.pkey) == 1 then
      redis.call('PEXPIRE', b.pkey, b.cfg.keep_ms)
    end
  else
    redis.call('HSET', b.hkey, 'co', b.co, 'er', br_erased_text(b), 'be', fmt(b.be), 'w',
      table.concat(b.w, ','))
  end
  redis.call('PEXPIRE', b.hkey, b.cfg.keep_ms)
  b.dirty = false
  b.full = false
end

local function br_clear_window(b)
  for j = 1, 3 * BUCKETS do
    b.w[j] = 0
  end
end

-- Port of decide.window.buckets_passed: buckets to rotate so that the current one
-- ends after now (the division can round down: 1001 - 1000.1 over 0.1 is 8.99...).
local function buckets_passed(now, be, bs)
  local steps = math.floor((now - be) / bs) + 1
  if be + steps * bs <= now then
    steps = steps + 1
  end
  return steps
end

local function br_rotate(b, now)
  if now < b.be then
    if b.be - now > 2 * b.cfg.bucket_s then
      -- set before TIME went back (decide.breaker.BreakerState._rotate): the window
      -- rotates again from one bucket ahead
      b.be = now + b.cfg.bucket_s
      b.dirty = true
    end
    return
  end
  local bs = b.cfg.bucket_s
  local steps = buckets_passed(now, b.be, bs)
  if steps >= BUCKETS then
    br_clear_window(b)
  else
    for _ = 1, steps do
      for j = 1, 3 * (BUCKETS - 1) do
        b.w[j] = b.w[j + 3]
      end
      local last = 3 * (BUCKETS - 1)
      b.w[last + 1] = 0
      b.w[last + 2] = 0
      b.w[last + 3] = 0
    end
  end
  if b.be == 0 then
    b.be = now + bs
  else
    b.be = b.be + steps * bs
  end
  b.dirty = true
end

-- Port of decide.breaker.open_time: open_min_s doubled per failed half-open
-- round in a row, capped at open_s.
local function br_open_time(cfg, reopens)
  local first = cfg.open_min
  if first > cfg.open_s then
    first = cfg.open_s
  end
  if reopens > 62 then
    reopens = 62
  end
  local t = first * 2 ^ reopens
  if t > cfg.open_s then
    t = cfg.open_s
  end
  return t
end

local function br_transition(b, state, now, u)
  local previous = b.st
  b.st = state
  b.ep = b.ep + 1
  b.cr = 0
  if state == 'closed' then
    redis.call('DEL', b.pkey)
  else
    -- Otherwise probes of an earlier half-open round keep their slots until they
    -- report (their outcome is stale and not counted) or their lease runs out;
    -- marked stale ('-' before the id), a slot says its probe's epoch is gone
    -- (decide.breaker.BreakerState._transition).
    local held = redis.call('ZRANGE', b.pkey, 0, -1, 'WITHSCORES')
    for j = 1, #held, 2 do
      local id = held[j]
      if string.sub(id, 1, 1) ~= '-' then
        redis.call('ZREM', b.pkey, id)
        redis.call('ZADD', b.pkey, held[j + 1], '-' .. id)
      end
    end
  end
  if state == 'open' then
    if previous == 'half_open' then
      b.ro = b.ro + 1
    elseif previous == 'closed' then
      b.ro = 0
    end
    local spread = b.cfg.open_jitter * (2.0 * u - 1.0)
    b.oa = now
    b.ou = now + br_open_time(b.cfg, b.ro) * (1.0 + spread)
  elseif state == 'half_open' then
    if previous == 'closed' then -- (forced)
      b.ro = 0
    end
  elseif state == 'closed' then
    -- b.ro is kept (see decide.breaker: a probe whose body broke re-opens as its failure)
    b.co = 0
    b.er = 0
    b.pc = '0'
    br_clear_window(b)
  end
  b.full = true
end

local function br_totals(b)
  local calls, failures, slow = 0, 0, 0
  for j = 1, 3 * BUCKETS, 3 do
    calls = calls + b.w[j]
    failures = failures + b.w[j + 1]
    slow = slow + b.w[j + 2]
  end
  return calls, failures, slow
end

local function br_ratio_trips(cfg, calls, failures, slow)
  if calls < cfg.min_calls then
    return false
  end
  if failures >= cfg.failure_ratio * calls then
    return true
  end
  return cfg.slow_ratio >= 0 and slow >= cfg.slow_ratio * calls
end

local function br_should_open(b, now)
  local cfg = b.cfg
  if cfg.consecutive > 0 and b.co >= cfg.consecutive and not b.defer then
    return true
  end
  br_rotate(b, now)
  local calls, failures, slow = br_totals(b)
  return br_ratio_trips(cfg, calls, failures, slow)
end

-- Port of decide.breaker.streak_stands: returns since, opens. `ended`: a success of
-- this sync ended the streak `since` is of (the failures after it are a new one)
local function streak_stands(consecutive, streak, since, now, wait, ended)
  if consecutive <= 0 or streak < consecutive then
    return 0, false
  end
  if ended or since <= 0 or since > now then
    since = now
  end
  return since, now - since >= wait
end

-- returns verdict ('allow' | 'probe' | 'reject'), state, epoch, retry_after_s, probe_id
-- Port of the clock-step guard of decide.breaker.BreakerState.gate: an open breaker whose
-- open-until lies further ahead than its open time (with jitter) was opened before TIME
-- went back; it stays open for at most that long from now. Returns the time left.
local function br_open_left(b, now)
  local most = br_open_time(b.cfg, b.ro) * (1.0 + b.cfg.open_jitter)
  if b.ou - now > most then
    b.ou = now + most
    b.full = true
  end
  return b.ou - now
end

-- `pid`: the probe id the caller chose (a string: ids go beyond a Lua number's
-- integers); '0' or nil: the breaker's own counter
local function br_gate(b, now, u, pid)
  if b.st == 'closed' then
    return 'allow', 'closed', b.ep, 0, 0
  end
  if b.st == 'open' then
    if now < b.ou then
      return 'reject', 'open', b.ep, br_open_left(b, now), 0
    end
    br_transition(b, 'half_open', now, u)
  end
  local lease = b.cfg.lease
  -- probe leases started after now (TIME went back since): they run from now
  local later = redis.call('ZRANGEBYSCORE', b.pkey, '(' .. fmt(now), '+inf')
  for _, id in ipairs(later) do
    redis.call('ZADD', b.pkey, fmt(now), id)
  end
  redis.call('ZREMRANGEBYSCORE', b.pkey, '-inf', fmt(now - lease))
  local inflight = redis.call('ZCARD', b.pkey)
  if inflight < b.cfg.probes then
    local id = pid
    if id == nil or id == '0' then
      id = tostring(b.np)
      b.np = b.np + 1
      b.full = true
    end
    redis.call('ZADD', b.pkey, fmt(now), id)
    redis.call('PEXPIRE', b.pkey, b.cfg.keep_ms)
    return 'probe', 'half_open', b.ep, 0, id
  end
  local oldest = redis.call('ZRANGE', b.pkey, 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + lease - now
  if wait > b.cfg.open_s then
    wait = b.cfg.open_s
  end
  if wait < 0 then
    wait = 0
  end
  return 'reject', 'half_open', b.ep, wait, 0
end

-- A probe id: a string from a caller's ARGV, 0 (a number) or '0' when there is none.
local function is_probe(probe_id)
  return probe_id ~= 0 and probe_id ~= '0'
end

-- Port of BreakerState._broken: a call recorded as a success whose body then broke.
local function br_broken(b, epoch, probe_id, now, u)
  if is_probe(probe_id) then
    -- (only the probe whose success closed it: another's weighs as its failure, nothing)
    if b.st == 'closed' and b.ep == epoch + 1 and b.pc == probe_id then
      b.st = 'half_open' -- (the round it ended: a failed probe's re-opening)
      br_transition(b, 'open', now, u)
    end
    return b.st
  end
  if epoch ~= b.ep or b.st ~= 'closed' then
    return b.st
  end
  br_rotate(b, now)
  local turned = false
  for j = 3 * (BUCKETS - 1) + 1, 1, -3 do
    if b.w[j] > b.w[j + 1] then -- a success to turn
      b.w[j + 1] = b.w[j + 1] + 1
      turned = true
      break
    end
  end
  if not turned then
    local last = 3 * (BUCKETS - 1)
    b.w[last + 1] = b.w[last + 1] + 1
    b.w[last + 2] = b.w[last + 2] + 1
  end
  b.co = b.co + b.er + 1
  b.er = 0
  b.dirty = true
  if br_should_open(b, now) then
    br_transition(b, 'open', now, u)
  end
  return b.st
end

-- outcome: 's' success, 'f' failure, 'i' ignored, 'b' a success whose body broke.
-- Returns the state afterwards.
-- probe_id: a string ('0': none). A probe's outcome counts if its slot is held
-- unmarked (admitted in this epoch, whatever `epoch` says: a caller that lost
-- the gate's reply sends -1); marked stale or not held, it frees the slot only.
local function br_record(b, epoch, probe_id, outcome, slow, now, u)
  if outcome == 'b' then
    return br_broken(b, epoch, probe_id, now, u)
  end
  if is_probe(probe_id) then
    if redis.call('ZREM', b.pkey, probe_id) == 0 then
      redis.call('ZREM', b.pkey, '-' .. probe_id)
      return b.st
    end
  elseif epoch ~= b.ep then
    return b.st
  end
  if outcome == 'i' then
    return b.st
  end
  if b.st == 'half_open' then
    if is_probe(probe_id) then
      if outcome == 'f' or slow then
        br_transition(b, 'open', now, u)
      else
        br_transition(b, 'closed', now, u)
        b.pc = probe_id
      end
    end
    return b.st
  end
  if b.st ~= 'closed' then
    return b.st
  end
  br_rotate(b, now)
  local last = 3 * (BUCKETS - 1)
  b.w[last + 1] = b.w[last + 1] + 1
  local failed = outcome == 'f'
  if failed then
    b.w[last + 2] = b.w[last + 2] + 1
    b.co = b.co + 1
    b.er = 0
  else
    b.er = b.co
    b.co = 0
  end
  if slow then
    b.w[last + 3] = b.w[last + 3] + 1
  end
  b.dirty = true
  -- every outcome, a success too: F,F,F,S reaches min_calls on the success
  if br_should_open(b, now) then
    br_transition(b, 'open', now, u)
  end
  return b.st
end

-- Apply `n` plain successes an instance deferred (they were admitted in
-- `epoch`): counted only if that epoch is still the current one of a closed
-- breaker, as `n` calls to br_record(..., 's', false, ...) would. Each success
-- only lowers the ratios, so those calls would have opened the breaker iff the
-- first one that brings the window to min_calls did: check that one.
local function br_successes(b, epoch, n, now, u)
  if n <= 0 or epoch ~= b.ep or b.st ~= 'closed' then
    return
  end
  br_rotate(b, now)
  local calls, failures, slow = br_totals(b)
  local last = 3 * (BUCKETS - 1)
  b.w[last + 1] = b.w[last + 1] + n
  if n == 1 then -- each success ends the streak before it: after two, none is left
    b.er = b.co
  else
    b.er = 0
  end
  b.co = 0
  b.dirty = true
  local first = b.cfg.min_calls - calls
  if first < 1 then
    first = 1
  end
  if first <= n and br_ratio_trips(b.cfg, calls + first, failures, slow) then
    br_transition(b, 'open', now, u)
  end
end

-- ---------------------------------------------------------------- entry operations

-- One admission (admit.lua's ARGV from `a`; `keys`: its own keys only), decided at
-- `now`: the breaker gate, then every limit, all or nothing. Returns its reply.
-- admit.lua runs one (on KEYS); batch.lua runs a tick's worth in order.
local function admit_at(ARGV, a, keys, now)
  local k = 1
  local has_breaker = ARGV[a] == '1'
  local u = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  local i = a + 3
  local b = nil
  local verdict, state, epoch, wait, probe_id = 'allow', '', 0, 0, 0
  local held = nil -- the limit keys' values, read before the gate may write (below)
  if has_breaker then
    local cfg
    cfg, i = read_config(ARGV, i)
    b = br_load(keys[k], keys[k + 1], cfg)
    br_successes(b, tonumber(ARGV[i]), tonumber(ARGV[i + 1]), now, u)
    local pid = ARGV[i + 2]
    i = i + 3
    k = k + 2
    if b.st ~= 'closed' then
      -- The gate of a breaker that is not closed writes (a probe's lease), and a script
      -- is not rolled back on an error: a limit key of another type (WRONGTYPE), read
      -- after it, failed the admission with a lease nobody holds. Read them first.
      held = {}
      for j = 0, n - 1 do
        held[j + 1] = { tat_of(keys[k + j], now) }
      end
    end
    verdict, state, epoch, wait, probe_id = br_gate(b, now, u, pid)
    if verdict == 'reject' then
      br_save(b)
      return { fmt(now), verdict, state, epoch, fmt(wait), 0, 0 }
    end
  end
  local out = { fmt(now), verdict, state, epoch, fmt(wait), probe_id, 1 }
  local admitted = true
  local commits = {}
  local marks = nil
  local uncharged = {} -- per limit that would admit: where its fields are, its bucket
  for j = 0, n - 1 do
    local key = keys[k + j]
    local interval = tonumber(ARGV[i])
    local tol = tonumber(ARGV[i + 1])
    local cost = tonumber(ARGV[i + 2])
    local shadow = ARGV[i + 3] == '1'
    i = i + 4
    local stored, refunded, credit, expires, wrote
    if held then
      stored, refunded, credit, expires, wrote = unpack(held[j + 1])
    else
      stored, refunded, credit, expires, wrote = tat_of(key, now)
    end
    local allowed, tat, remaining, reset, retry = gcra(stored, now, interval, tol, cost, wrote)
    if not allowed and tat ~= stored then
      -- repaired (stored before TIME went back: see unstep), whatever the others decide
      stored, wrote = tat, recorded(tat - now)
      store_tat(key, tat, now, refunded, credit, expires, wrote)
    end
    local code = 1
    if not allowed and credit > 0 then
      local left = spend_credit(credit, expires, now, interval, cost)
      if left then -- admitted from retry credit: the TAT stays as it was
        allowed, code, credit, retry = true, 2, left, 0
      end
    end
    if allowed and code == 1 then
      uncharged[#uncharged + 1] = { #out + 2, stored, interval, tol, wrote }
      wrote = recorded(tat - now) -- (this admission writes the TAT; credit leaves it)
    end
    if allowed then
      commits[#commits + 1] = { key, tat, refunded, credit, expires, wrote }
      if refunded > 0 then
        marks = marks or {}
        marks[j + 1] = refunded
      end
    elseif not shadow then
      admitted = false
    end
    out[#out + 1] = allowed and code or 0
    out[#out + 1] = remaining
    out[#out + 1] = fmt(reset)
    out[#out + 1] = fmt(retry)
  end
  if admitted then
    for _, c in ipairs(commits) do
      store_tat(c[1], c[2], now, c[3], c[4], c[5], c[6])
    end
    if marks ~= nil then
      -- keys that had refunds: each limit's refunded seconds after the limits,
      -- for the marker the verdict reports (fidelity_mw.decide.gcra.marker)
      for j = 1, n do
        out[#out + 1] = fmt(marks[j] or 0)
      end
    end
  else
    out[7] = 0
    -- nothing is charged: a limit that would have admitted reports its bucket as it is
    for _, lim in ipairs(uncharged) do
      local _, _, remaining, reset = gcra(lim[2], now, lim[3], lim[4], 0, lim[5])
      out[lim[1]] = remaining
      out[lim[1] + 1] = fmt(reset)
    end
    if b ~= nil and probe_id ~= 0 then -- (a string when one was taken)
      br_record(b, epoch, probe_id, 'i', false, now, u)
    end
  end
  if b ~= nil then
    br_save(b)
  end
  return out
end

-- One outcome record (record.lua's ARGV from `a`; `keys`: breaker hash, breaker
-- probes) at `now`. Returns its reply.
local function record_at(ARGV, a, keys, now)
  local u = tonumber(ARGV[a])
  local epoch = tonumber(ARGV[a + 1])
  local probe_id = ARGV[a + 2]
  local outcome = ARGV[a + 3]
  local slow = ARGV[a + 4] == '1'
  local cfg = read_config(ARGV, a + 7)
  local b = br_load(keys[1], keys[2], cfg)
  br_successes(b, tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), now, u)
  local state = br_record(b, epoch, probe_id, outcome, slow, now, u)
  br_save(b)
  return { state, b.ep }
end
