-- admit: the route breaker gate and every rate limit of one request, atomically.
--
-- KEYS: [breaker hash, breaker probes] if ARGV[1] == '1', then one TAT key per limit.
-- ARGV: has_breaker, jitter u in [0,1), n_limits,
--       [10 breaker config values, deferred_epoch, deferred_successes, probe_id],
--       then per limit: interval_s, tolerance_s, cost, shadow (0/1).
-- Deferred successes (see RedisStore.record) are applied before the gate. probe_id:
-- chosen by the caller (0: the breaker's counter), the id a probe slot is taken under,
-- known to the caller whether or not it reads the reply.
-- Returns: now, verdict, state, epoch, retry_after_s, probe_id, admitted,
--          then per limit: allowed (0/1; 2: admitted from retry credit, the TAT
--          unchanged), remaining, reset_s, retry_after_s; then, if a committed key
--          had refunds, each limit's refunded seconds (see lib.lua admit_at).
-- Limits are committed only if the breaker admits and every enforced limit
-- allows; a probe slot taken by the gate is given back when a limit rejects.

-- The work is lib.lua's admit_at, shared with batch.lua.

local out = admit_at(ARGV, 1, KEYS, server_now())
return out
