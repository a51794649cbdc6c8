-- sync: one reconciliation of a tiered instance with the fleet's state.
--
-- For each breaker: apply the outcome counts the instance gathered since its
-- last sync (only if they were counted in the current epoch of a closed
-- breaker), maybe open it, and report its state. For each limit: give back
-- the unused units of the instance's expired slice, then lease a new slice
-- of up to `want` units (all or nothing below `min_take`). With `ahead` > 0
-- the slice may include units that conform only later, up to `ahead`
-- seconds from now (a saturated key: the instance spends unit j no earlier
-- than `first` + j x interval), so capacity nobody asked for in time is not
-- lost and the lease is worth its round trip.
--
-- KEYS: [breaker hash, breaker probes] x nb, then one TAT key per limit.
-- ARGV: jitter u, nb, nl,
--       per breaker: [10 config values], epoch, outcomes: the instance's outcomes in
--                    order, as runs of one kind ('f' failure, 's' success, upper case
--                    when slow, 'b' a success whose body then broke, then the count:
--                    "s40f2S1s7b1"; '' for none)
--       per limit: interval_s, tolerance_s, give_back, want, min_take, ahead_s,
--       then (optional) streak_wait_s: a failure streak these runs bring to
--       consecutive_failures opens the breaker only once it has stood that long with no
--       success synced meanwhile (decide.breaker.streak_stands; 0 or none: at once)
-- Returns: now, then per breaker: state, epoch, wait_s (time until a probe
--          may be admitted; 0 when closed or when a probe slot is free),
--          then per limit: granted, remaining (units left that conform now),
--          retry_after_s, first_s (when the first granted unit conforms,
--          from now; <= 0: already).
--          A breaker or limit whose key holds a value that is not ours (WRONGTYPE)
--          fails alone, as in batch.lua: its first value is '!' and the error's
--          text (a breaker: '!text', 0, 0; a limit: '!text', 0, 0, 0) and nothing of
--          it was written (each reads its keys before it writes); the others are
--          synced as they would be.

local now = server_now()
local u = tonumber(ARGV[1])
local nb = tonumber(ARGV[2])
local nl = tonumber(ARGV[3])
local streak_wait = tonumber(ARGV[4 + 12 * nb + 6 * nl]) or 0
local i = 4
local out = { fmt(now) }
-- a failed breaker's or limit's reply: '!' and the error's text
local function err_text(e)
  return '!' .. tostring(type(e) == 'table' and e.err or e)
end
for j = 0, nb - 1 do
  local cfg
  cfg, i = read_config(ARGV, i)
  local epoch = tonumber(ARGV[i])
  local runs = ARGV[i + 1]
  i = i + 2
  local mark = #out
  local ok, failed = pcall(function()
    local b = br_load(KEYS[2 * j + 1], KEYS[2 * j + 2], cfg)
    b.defer = streak_wait > 0
    local ended = false -- a success of these runs ended the streak `cr` is of
    if runs ~= '' and epoch == b.ep and b.st == 'closed' then
      -- Replayed as fidelity_mw.decide.breaker.BreakerState.record counts them, one by
      -- one, checked after every outcome (a success too), until one opens the breaker
      -- (the rest were admitted in the epoch that ended: not counted). Within a run of
      -- one kind each ratio moves in one direction, so the outcome that brings the
      -- window to min_calls and the run's last are the ones to check; the failure
      -- streak only grows within a run of failures: its last.
      br_rotate(b, now)
      b.dirty = true
      local calls, fails, slows = br_totals(b)
      local last = 3 * (BUCKETS - 1)
      for kind, count in string.gmatch(runs, '(%a)(%d+)') do
        local n = tonumber(count)
        local trips = false
        if kind == 'b' then
          -- each turns a success into a failure (br_broken, which opens the breaker
          -- when the window trips), replayed one by one
          for _ = 1, n do
            br_broken(b, epoch, 0, now, u)
            if b.st ~= 'closed' then
              break
            end
          end
          if b.st ~= 'closed' then
            break
          end
          calls, fails, slows = br_totals(b)
        else
          local df = (kind == 'f' or kind == 'F') and 1 or 0
          local ds = (kind == 'F' or kind == 'S') and 1 or 0
          b.w[last + 1] = b.w[last + 1] + n
          b.w[last + 2] = b.w[last + 2] + n * df
          b.w[last + 3] = b.w[last + 3] + n * ds
          if df == 1 then
            b.co = b.co + n
            b.er = 0
          else
            if n == 1 then -- the streak the last success ended (after two: none)
              b.er = b.co
            else
              b.er = 0
            end
            b.co = 0
            ended = true
          end
          trips = df == 1 and cfg.consecutive > 0 and b.co >= cfg.consecutive and not b.defer
          local first = cfg.min_calls - calls
          if first < 1 then
            first = 1
          end
          if not trips and first <= n then
            trips = br_ratio_trips(cfg, calls + first, fails + first * df, slows + first * ds)
          end
          calls, fails, slows = calls + n, fails + n * df, slows + n * ds
          if not trips then
            trips = br_ratio_trips(cfg, calls, fails, slows)
          end
        end
        if trips then
          br_transition(b, 'open', now, u)
          break
        end
      end
    end
    if b.defer and b.st == 'closed' then
      -- (every sync of the breaker looks, with runs or none: a streak that stood its
      -- wait opens at the next sync of any process)
      local since, opens = streak_stands(cfg.consecutive, b.co, b.cr, now, streak_wait, ended)
      if opens then
        br_transition(b, 'open', now, u)
      elseif since ~= b.cr then
        b.cr = since
        b.dirty = true
        redis.call('HSET', b.hkey, 'cr', fmt(since))
      end
    end
    local wait = 0
    if b.st == 'open' then
      wait = br_open_left(b, now) -- (at most its open time: TIME may have gone back)
      if wait < 0 then
        wait = 0
      end
    elseif b.st == 'half_open' then
      redis.call('ZREMRANGEBYSCORE', b.pkey, '-inf', fmt(now - cfg.lease))
      if redis.call('ZCARD', b.pkey) >= cfg.probes then
        local oldest = redis.call('ZRANGE', b.pkey, 0, 0, 'WITHSCORES')
        wait = tonumber(oldest[2]) + cfg.lease - now
        if wait > cfg.open_s then
          wait = cfg.open_s
        end
        if wait < 0 then
          wait = 0
        end
      end
    end
    br_save(b)
    out[#out + 1] = b.st
    out[#out + 1] = b.ep
    out[#out + 1] = fmt(wait)
  end)
  if not ok then
    for x = #out, mark + 1, -1 do
      out[x] = nil
    end
    out[#out + 1] = err_text(failed)
    out[#out + 1] = 0
    out[#out + 1] = '0'
  end
end
local k = 2 * nb + 1
for j = 0, nl - 1 do
  local key = KEYS[k + j]
  local interval = tonumber(ARGV[i])
  local tol = tonumber(ARGV[i + 1])
  local give = tonumber(ARGV[i + 2])
  local want = tonumber(ARGV[i + 3])
  local min_take = tonumber(ARGV[i + 4])
  local ahead = tonumber(ARGV[i + 5])
  i = i + 6
  local mark = #out
  local ok, failed = pcall(function()
    local tat, refunded, credit, expires, wrote = tat_of(key, now)
    local changed = false
    local repaired = unstep(tat, now, tol, wrote)
    if repaired ~= tat then -- (stored before TIME went back: see lib.lua)
      tat, changed, wrote = repaired, true, recorded(repaired - now)
    end
    if give > 0 then
      -- a refund (fidelity_mw.decide.gcra.refund): counted in the key's refunded seconds
      tat = tat - give * interval
      refunded = refunded + give * interval
      changed = true
    end
    local base = tat
    if now > base then
      base = now
    end
    local slack = slack_of(now, interval, tol)
    local avail = math.floor((tol - (base - now) + slack) / interval)
    if avail < 0 then
      avail = 0
    end
    local granted = 0
    local retry = 0
    -- the first granted unit conforms once base + interval - tol has passed
    local first = base + interval - tol - now
    if want > 0 then
      local take = want
      local can = avail
      if ahead > 0 then
        can = math.floor((tol + ahead - (base - now) + slack) / interval)
      end
      if can < take then
        take = can
      end
      if take >= min_take then
        granted = take
        tat = charged(base, take * interval)
        changed = true
        wrote = recorded(tat - now)
      else
        retry = base + min_take * interval - tol - ahead - now
        if retry < 0 then
          retry = 0
        end
      end
    end
    local left = avail - granted
    if left < 0 then
      left = 0
    end
    if changed then
      if tat + refunded > now or credit > 0 then -- retry credit stays as it was
        store_tat(key, tat, now, refunded, credit, expires, wrote)
      else
        redis.call('DEL', key)
      end
    end
    out[#out + 1] = granted
    out[#out + 1] = left
    out[#out + 1] = fmt(retry)
    out[#out + 1] = fmt(first)
  end)
  if not ok then
    for x = #out, mark + 1, -1 do
      out[x] = nil
    end
    out[#out + 1] = err_text(failed)
    out[#out + 1] = 0
    out[#out + 1] = '0'
    out[#out + 1] = '0'
  end
end
return out
