-- Shared prelude, prepended to acquire.lua, region.lua and snapshot.lua when they are
-- registered. The first half is a line-by-line port of balancer/policy.py: Lua numbers
-- are IEEE doubles like Python floats, and every expression below keeps the operand
-- order of the Python original, so both backends round identically and make the same
-- choice for the same random number r. Change the two together.

local INF = math.huge

local function refill(level, elapsed, rate, capacity)
  if elapsed > 0 then
    level = level + elapsed * rate
  end
  return math.min(level, capacity)
end

local function need(cost, capacity)
  return math.min(cost, capacity)
end

local function admissible(level, cost, lim)
  return level.cooldown <= 0
    and level.tokens >= need(cost, lim.tokens_capacity)
    and level.requests >= need(1, lim.requests_capacity)
end

local function wait_seconds(level, cost, lim)
  local wait = math.max(level.cooldown, 0.0)
  local short = need(cost, lim.tokens_capacity) - level.tokens
  if short > 0 then
    local w = INF
    if lim.tokens_rate > 0 then w = short / lim.tokens_rate end
    wait = math.max(wait, w)
  end
  short = need(1, lim.requests_capacity) - level.requests
  if short > 0 then
    local w = INF
    if lim.requests_rate > 0 then w = short / lim.requests_rate end
    wait = math.max(wait, w)
  end
  return wait
end

local function weight(level, lim)
  return (math.max(level.tokens, 0.0) + 1.0) * lim.weight
end

local THROTTLE_TOLERANCE = 0.97
local THROTTLE_MAX_CUT = 0.5
local THROTTLE_BACKOFF = 0.9
local DRIFT_DECREASE = 0.9
local WINDOW_SPAN = 12.0
local SATURATED = 0.9
local RESERVE = 0.5
local LATENCY_SMOOTHING = 0.2

local function effective(lim, factor)
  if factor >= 1.0 then return lim end
  local eff = {}
  for name, value in pairs(lim) do eff[name] = value end
  eff.tokens_capacity = lim.tokens_capacity * factor
  eff.tokens_rate = lim.tokens_rate * factor
  return eff
end

local function recover(factor, elapsed, rate)
  if elapsed > 0 then
    factor = factor + elapsed * rate
  end
  return math.min(factor, 1.0)
end

local function decrease(factor, lim, by)
  return math.max(lim.min_factor, factor * by)
end

local function calm_seconds(lim)
  if lim.tokens_rate > 0 then return lim.tokens_capacity / lim.tokens_rate end
  return 0.0
end

-- nil where policy.window_share returns None; `start` and `ref` are policy.Refusals.
local function window_share(lim, span, sent, start, ref)
  local refill = (span + ref.high_wait - start.low_wait) * lim.tokens_rate
  if span <= 0 or refill <= 0 then return nil end
  return (sent + ref.high - start.low) / refill
end

local function window_end(now, ref)
  if ref.reserved_at > 0 then return ref.reserved_at end
  return now
end

local function window_turn(lim, now, older, newer)
  local span = WINDOW_SPAN * calm_seconds(lim)
  return older <= 0 or now - older > span or newer <= 0 or now - newer >= span / 3
end

local function savings(lim, span, floor, steady, share)
  local gap = share - floor
  if gap <= 0 then return 0.0 end
  local rise = steady
  if lim.recovery_rate > 0 then rise = math.min(steady, gap / lim.recovery_rate) end
  return gap * (span - steady) + gap * rise - lim.recovery_rate * rise * rise / 2
end

local function window_usable(lim, factor, span, peak, floor, steady, share)
  local calm = calm_seconds(lim)
  if span > WINDOW_SPAN * calm or peak > SATURATED * lim.tokens_capacity * factor then
    return false
  end
  return savings(lim, span, floor, steady, share) <= RESERVE * share * calm
end

local function cut_target(factor, share)
  if share >= factor * THROTTLE_TOLERANCE then return nil end
  return share * THROTTLE_BACKOFF
end

local function bounded(lim, top, target)
  return math.max(lim.min_factor, top * THROTTLE_MAX_CUT, target)
end

local function smooth(average, sample)
  if average <= 0 then return sample end
  return average + LATENCY_SMOOTHING * (sample - average)
end

local function latency_factor(latency, fastest, strength)
  if strength <= 0 or latency <= 0 or fastest <= 0 then return 1.0 end
  return (fastest / latency) ^ strength
end

-- 1-based index picked with probability proportional to its weight, -1 if none.
-- The total is a plain left-to-right sum, as Python 3.11's sum() of floats.
local function choose(weights, n, r)
  local total = 0
  for i = 1, n do
    if weights[i] > 0 then total = total + weights[i] end
  end
  if total <= 0 then return -1 end
  local target = r * total
  local last = -1
  for i = 1, n do
    local w = weights[i]
    if w > 0 then
      last = i
      target = target - w
      if target < 0 then return i end
    end
  end
  return last -- r close to 1 and float rounding
end

local function pick(limits, levels, n, cost, r)
  local seen, tiers = {}, {}
  for i = 1, n do
    local p = limits[i].priority
    if not seen[p] then
      seen[p] = true
      tiers[#tiers + 1] = p
    end
  end
  table.sort(tiers)
  for _, tier in ipairs(tiers) do
    local ok, fastest = {}, 0.0
    for i = 1, n do
      ok[i] = limits[i].priority == tier and admissible(levels[i], cost, limits[i])
      local lat = levels[i].latency
      if ok[i] and lat > 0 and (fastest <= 0 or lat < fastest) then fastest = lat end
    end
    local weights = {}
    for i = 1, n do
      if ok[i] then
        weights[i] = weight(levels[i], limits[i])
          * latency_factor(levels[i].latency, fastest, limits[i].latency_weight)
      else
        weights[i] = 0.0
      end
    end
    local index = choose(weights, n, r)
    if index > 0 then return index end
  end
  return -1
end

local function retry_after(limits, levels, n, cost)
  local best = INF
  for i = 1, n do
    best = math.min(best, wait_seconds(levels[i], cost, limits[i]))
  end
  return best
end

local function queue_wait(ahead_cost, cost, limits, levels, n)
  local rate, have = 0.0, 0.0
  for i = 1, n do
    rate = rate + limits[i].tokens_rate
    have = have + math.max(levels[i].tokens, 0.0)
  end
  local short = ahead_cost + cost - have
  if short <= 0 then return 0.0 end
  if rate > 0 then return short / rate end
  return INF
end

-- Bucket storage: one HASH per (model, region). Floats travel as "%.17g" strings,
-- which round-trip exactly (tostring keeps only 14 digits, and Redis truncates Lua
-- numbers returned to the client to integers).

local function fmt(x)
  return string.format('%.17g', x)
end

local function clock()
  local t = redis.call('TIME') -- the server's clock: the replicas' clocks differ
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Limits travel as one string per call: per region the values of policy.Limits' fields
-- but `region`, in the order of LIMIT_FIELDS (defined before this file by redis.py's
-- lua_prelude, from the Python dataclass), separated by spaces; regions separated by ';'.
-- One argument instead of one per field keeps the client's packing cheap; positions
-- rather than `name=value` pairs make parsing a tonumber per word (an 8-region acquire
-- spent a quarter of its Redis time parsing names).
local function parse_fields(text, names)
  local out, i = {}, 0
  for value in string.gmatch(text, '%S+') do
    i = i + 1
    out[names[i]] = tonumber(value)
  end
  return out
end

local function parse_limits(text)
  local out = {}
  for region in string.gmatch(text, '[^;]+') do
    out[#out + 1] = parse_fields(region, LIMIT_FIELDS)
  end
  return out
end

-- The bucket refilled up to `now` (a missing, new or expired, one starts full), with
-- `b.eff` its effective limits: the configured ones scaled by the learned factor.
local function load(key, lim, now)
  local v = redis.call('HMGET', key, 'tokens', 'requests', 'ts', 'cooldown_until',
    'failures', 'tripped', 'factor', 'lat', 'calm', 'granted', 'peak')
  if not v[1] then
    return { tokens = lim.tokens_capacity, requests = lim.requests_capacity,
      cooldown_until = 0, failures = 0, tripped = 0, factor = 1.0, lat = 0.0,
      calm_until = 0, granted = 0, peak = lim.tokens_capacity, eff = lim, exists = false }
  end
  local elapsed = now - tonumber(v[3])
  local factor = recover(tonumber(v[7]) or 1.0, elapsed, lim.recovery_rate)
  local eff = effective(lim, factor)
  local tokens = refill(tonumber(v[1]), elapsed, eff.tokens_rate, eff.tokens_capacity)
  return {
    tokens = tokens,
    requests = refill(tonumber(v[2]), elapsed, eff.requests_rate, eff.requests_capacity),
    cooldown_until = tonumber(v[4]) or 0,
    failures = tonumber(v[5]) or 0,
    tripped = tonumber(v[6]) or 0,
    factor = factor,
    lat = tonumber(v[8]) or 0.0,
    calm_until = tonumber(v[9]) or 0,
    granted = tonumber(v[10]) or 0,
    peak = math.max(tonumber(v[11]) or tokens, tokens),
    eff = eff,
    exists = true,
  }
end

local function level_of(b, now)
  return { tokens = b.tokens, requests = b.requests,
    cooldown = math.max(0.0, b.cooldown_until - now), latency = b.lat }
end

-- Every write refreshes the TTL, so a region removed from the config leaves nothing
-- behind; the key always outlives its own cooldown.
local function expire(key, b, now, ttl)
  local keep = math.min(math.max(ttl, math.ceil(b.cooldown_until - now) + 1), 1e9)
  redis.call('EXPIRE', key, string.format('%d', keep))
end

local function save(key, b, now, ttl)
  redis.call('HSET', key, 'tokens', fmt(b.tokens), 'requests', fmt(b.requests),
    'ts', fmt(now), 'cooldown_until', fmt(b.cooldown_until),
    'failures', string.format('%d', b.failures), 'tripped', string.format('%d', b.tripped),
    'factor', fmt(b.factor), 'lat', fmt(b.lat), 'calm', fmt(b.calm_until),
    'granted', fmt(b.granted), 'peak', fmt(b.peak))
  expire(key, b, now, ttl)
end

-- What a grant changes (acquire.lua): the levels, the stamp and what the stamp implies
-- (the factor's recovery, the peak), and the tokens granted. A bucket that exists keeps
-- the rest as stored (acquire only read it): half the fields to format and write.
local function save_grant(key, b, now, ttl)
  if not b.exists then return save(key, b, now, ttl) end
  redis.call('HSET', key, 'tokens', fmt(b.tokens), 'requests', fmt(b.requests),
    'ts', fmt(now), 'factor', fmt(b.factor), 'granted', fmt(b.granted), 'peak', fmt(b.peak))
  expire(key, b, now, ttl)
end

-- Learned capacity's windows between 429s (MemoryStore's _Window), in the same hash:
-- read only by the writes that use them (settle, cooldown, observe), not by acquire.
local WINDOW_FIELDS = { 'start', 'granted', 'adjust', 'low', 'low_wait', 'peak', 'floor' }
local WINDOW_DEFAULTS = { 0, 0, 0, 0, 0, 0, 1.0 }
local LEARNING_FIELDS = { 'top', 'cut' }
for _, side in ipairs({ 'a_', 'b_' }) do
  for _, name in ipairs(WINDOW_FIELDS) do LEARNING_FIELDS[#LEARNING_FIELDS + 1] = side .. name end
end

local function load_learning(key, b)
  local v = redis.call('HMGET', key, unpack(LEARNING_FIELDS))
  b.calm_top = tonumber(v[1]) or 1.0
  b.cut_at = tonumber(v[2]) or 0
  local function window(offset)
    local w = {}
    for i, name in ipairs(WINDOW_FIELDS) do
      w[name] = tonumber(v[offset + i]) or WINDOW_DEFAULTS[i]
    end
    return w
  end
  b.older = window(2)
  b.newer = window(2 + #WINDOW_FIELDS)
end

local function save_learning(key, b)
  local args = { 'top', fmt(b.calm_top), 'cut', fmt(b.cut_at) }
  for _, pair in ipairs({ { 'a_', b.older }, { 'b_', b.newer } }) do
    for _, name in ipairs(WINDOW_FIELDS) do
      args[#args + 1] = pair[1] .. name
      args[#args + 1] = fmt(pair[2][name])
    end
  end
  redis.call('HSET', key, unpack(args))
end

-- Lower the factor toward `target`, by at most THROTTLE_MAX_CUT within one refill
-- window (MemoryStore._shrink, policy.bounded). Needs load_learning.
local function shrink(b, lim, now, target)
  local fresh = now >= b.calm_until
  local top = b.calm_top
  if fresh then top = b.factor end
  local factor = bounded(lim, top, target)
  if factor < b.factor then
    if fresh then
      b.calm_top = b.factor
      b.calm_until = now + calm_seconds(lim)
    end
    b.factor = factor
    b.cut_at = now
    b.older.floor = math.min(b.older.floor, factor)
    b.newer.floor = math.min(b.newer.floor, factor)
  end
end

-- The factor the window since `w`'s 429 asks for, ending at this 429 (MemoryStore's
-- _window_target); nil for none.
local function window_target(b, w, lim, now, ref)
  if w.start <= 0 then return nil end
  local e = window_end(now, ref)
  local span = e - w.start
  local share = window_share(lim, span, b.granted - w.granted + w.adjust, w, ref)
  if share == nil or not window_usable(lim, b.factor, span, math.max(w.peak, b.peak),
      w.floor, math.max(0.0, e - math.max(w.start, b.cut_at)), share) then
    return nil
  end
  return cut_target(b.factor, share)
end

-- Redis < 5 needs effects replication to write after reading TIME; 5+ always does it.
if redis.replicate_commands then pcall(redis.replicate_commands) end
