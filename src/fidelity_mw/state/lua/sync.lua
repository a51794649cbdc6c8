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
--       per breaker: [10 config values], epoch, calls, failures, slow,
--                    lead, maxrun, trail, had_success (0/1)
--       per limit: interval_s, tolerance_s, give_back, want, min_take, ahead_s
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
  local calls = tonumber(ARGV[i + 1])
  local failures = tonumber(ARGV[i + 2])
  local slow = tonumber(ARGV[i + 3])
  local lead = tonumber(ARGV[i + 4])
  local maxrun = tonumber(ARGV[i + 5])
  local trail = tonumber(ARGV[i + 6])
  local had_success = ARGV[i + 7] == '1'
  i = i + 8
  local mark = #out
  local ok, failed = pcall(function()
    local b = br_load(KEYS[2 * j + 1], KEYS[2 * j + 2], cfg)
    if calls > 0 and epoch == b.ep and b.st == 'closed' then
      br_rotate(b, now)
      local last = 3 * (BUCKETS - 1)
      b.w[last + 1] = b.w[last + 1] + calls
      b.w[last + 2] = b.w[last + 2] + failures
      b.w[last + 3] = b.w[last + 3] + slow
      local peak
      if had_success then
        peak = math.max(b.co + lead, maxrun, trail)
        b.co = trail
      else
        b.co = b.co + trail
        peak = b.co
      end
      b.dirty = true
      -- every batch of outcomes, successes too (the ratio is checked on each)
      local by_run = cfg.consecutive > 0 and peak >= cfg.consecutive
      if by_run or br_should_open(b, now) then
        br_transition(b, 'open', now, u)
      end
    end
    local wait = 0
    if b.st == 'open' then
      wait = b.ou - now
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
    local tat, refunded, credit, expires = tat_of(key, now)
    local changed = false
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
        tat = base + take * interval
        changed = true
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
        store_tat(key, tat, now, refunded, credit, expires)
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
