-- One write to one region's bucket, refilled first as policy.refill does.
-- KEYS[1]  the bucket
-- ARGV     op, ttl, then for every op but record_success the limits (see parse_limits) and:
--   settle           delta    tokens to charge (actual - reserved; negative refunds),
--                    latency  seconds per output token ("" when there is no sample)
--   cooldown         seconds, share (the refill rate the 429 implies, as a share of the
--                    configured one, "" when it implies none: see policy.throttled_factor)
--   observe          remaining  tokens the region reported left
--   record_failure   threshold, open_seconds
--   record_success   (nothing)
-- Returns 1 when record_failure left the circuit open, else 0.

local key = KEYS[1]
local op = ARGV[1]
local ttl = tonumber(ARGV[2])
local now = clock()

if op == 'record_success' then
  -- Close the circuit; an unknown region has nothing to reset (and needs no key).
  local v = redis.call('HMGET', key, 'failures', 'tripped', 'cooldown_until')
  if (tonumber(v[1]) or 0) ~= 0 or (tonumber(v[2]) or 0) ~= 0 then
    redis.call('HSET', key, 'failures', '0', 'tripped', '0')
    expire(key, { cooldown_until = tonumber(v[3]) or 0 }, now, ttl)
  end
  return 0
end

-- One decrease per refill window, not per 429 (policy.calm_seconds says why).
local function shrink(b, lim, now, factor)
  if factor < b.factor and now >= b.calm_until then
    b.factor = factor
    b.calm_until = now + calm_seconds(lim)
  end
end

local lim = parse_limits(ARGV[3])[1]
local b = load(key, lim, now)
local result = 0

if op == 'settle' then
  -- A refund never fills the bucket beyond capacity.
  b.tokens = math.min(b.tokens - tonumber(ARGV[4]), b.eff.tokens_capacity)
  local latency = tonumber(ARGV[5] or '')
  if latency and latency > 0 then b.lat = smooth(b.lat, latency) end
elseif op == 'cooldown' then
  local share = tonumber(ARGV[5] or '')
  if share then shrink(b, lim, now, throttled_factor(b.factor, lim, share)) end
  b.cooldown_until = math.max(b.cooldown_until, now + tonumber(ARGV[4]))
  b.tokens = math.min(b.tokens, 0.0) -- the region told us it is empty
elseif op == 'observe' then
  local remaining = tonumber(ARGV[4])
  if remaining < b.tokens then
    b.tokens = remaining
    shrink(b, lim, now, decrease(b.factor, lim, DRIFT_DECREASE))
  end
elseif op == 'record_failure' then
  b.failures = b.failures + 1
  if b.failures >= tonumber(ARGV[4]) then
    b.tripped = 1
    b.cooldown_until = math.max(b.cooldown_until, now + tonumber(ARGV[5]))
    result = 1
  end
else
  return redis.error_reply('unknown op ' .. tostring(op))
end

save(key, b, now, ttl)
return result
