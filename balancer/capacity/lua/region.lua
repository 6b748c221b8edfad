-- One write to one region's bucket, refilled first as policy.refill does.
-- KEYS[1]  the bucket
-- ARGV     op, ttl, then for every op but record_success the limits (see parse_limits) and:
--   settle           delta    tokens to charge (actual - reserved; negative refunds),
--                    latency  seconds per output token ("" when there is no sample),
--                    granted  the grant's count of tokens ever reserved (Grant.granted),
--                    then for a client's grant its limits and name; KEYS[2] and KEYS[3]
--                    its budget and the model's fair-share book (ClientBook.settle)
--   cooldown         seconds, share (the refill rate the 429 implies, as a share of the
--                    configured one, "" when it implies none: see policy.cut_target),
--                    then the 429's policy.Refusal: high, high_wait, low, low_wait,
--                    reserved_at, granted ("" when none)
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

local lim = parse_limits(ARGV[3])[1]
local b = load(key, lim, now)
local result = 0

if op == 'settle' then
  -- A refund never fills the bucket beyond capacity.
  local delta = tonumber(ARGV[4])
  b.tokens = math.min(b.tokens - delta, b.eff.tokens_capacity)
  local latency = tonumber(ARGV[5] or '')
  if latency and latency > 0 then b.lat = smooth(b.lat, latency) end
  if delta ~= 0 then
    -- What the learned-capacity windows begun before this grant count as sent.
    local granted = tonumber(ARGV[6] or '') or 0
    local v = redis.call('HMGET', key, 'a_start', 'a_granted', 'a_adjust', 'b_start',
      'b_granted', 'b_adjust')
    for i, side in ipairs({ 'a_', 'b_' }) do
      local start, since = tonumber(v[i * 3 - 2]) or 0, tonumber(v[i * 3 - 1]) or 0
      if start > 0 and granted > since then
        redis.call('HSET', key, side .. 'adjust', fmt((tonumber(v[i * 3]) or 0) + delta))
      end
    end
    if KEYS[2] then
      local c = parse_client(ARGV[7])
      local budget = load_budget(KEYS[2], c, now)
      if c.tokens_capacity > 0 then
        budget.tokens = math.min(budget.tokens - delta, c.tokens_capacity)
      end
      budget.day_used = math.max(0.0, budget.day_used + delta)
      budget.month_used = math.max(0.0, budget.month_used + delta)
      save_budget(KEYS[2], c, budget, now, ttl)
      if c.fair_window > 0 then
        local book, me = load_book(KEYS[3], ARGV[8], now, c.fair_window)
        book, me = fair_entry(book, me, ARGV[8], c.weight, now)
        book[me].used = math.max(0.0, book[me].used + delta)
        save_fair(KEYS[3], book[me], now, ttl)
      end
    end
  end
elseif op == 'cooldown' then
  load_learning(key, b)
  local share = tonumber(ARGV[5] or '')
  local high = tonumber(ARGV[6] or '')
  local target = nil
  if share and now >= b.calm_until then target = cut_target(b.factor, share) end
  local ref = nil
  if high then
    ref = { high = high, high_wait = tonumber(ARGV[7]), low = tonumber(ARGV[8]),
      low_wait = tonumber(ARGV[9]), reserved_at = tonumber(ARGV[10]),
      granted = tonumber(ARGV[11]) }
    for _, w in ipairs({ b.older, b.newer }) do
      local bound = window_target(b, w, lim, now, ref)
      if bound and (target == nil or bound < target) then target = bound end
    end
  end
  if target then shrink(b, lim, now, target) end
  b.cooldown_until = math.max(b.cooldown_until, now + tonumber(ARGV[4]))
  b.tokens = math.min(b.tokens, 0.0) -- the region told us it is empty
  b.older.peak = math.max(b.older.peak, b.peak)
  b.newer.peak = math.max(b.newer.peak, b.peak)
  if ref and window_turn(lim, now, b.older.start, b.newer.start) then
    local since = b.granted
    if ref.granted > 0 then since = ref.granted end
    b.older = b.newer
    b.newer = { start = now, granted = since, adjust = 0.0, low = ref.low,
      low_wait = ref.low_wait, peak = b.tokens, floor = b.factor }
  end
  b.peak = b.tokens
  save_learning(key, b)
elseif op == 'observe' then
  local remaining = tonumber(ARGV[4])
  if remaining < b.tokens then
    b.tokens = remaining
    if now >= b.calm_until then -- a relative cut: once per refill window
      load_learning(key, b)
      shrink(b, lim, now, decrease(b.factor, lim, DRIFT_DECREASE))
      save_learning(key, b)
    end
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
