-- Clients: a line-by-line port of balancer/tenancy.py (budgets, calendar periods, fair
-- share) and the storage of capacity/tenants.py's ClientBook, prepended after lib.lua.
-- Change the three together.
--
-- A client's budget on a model is one HASH {prefix}:{<model>}:client:<name> (tokens,
-- requests, ts, day, day_used, month, month_used); the fair-share sums of all of a
-- model's clients are one HASH {prefix}:{<model>}:fair with fields <name>|d (demand),
-- <name>|u (used), <name>|t (stamp), <name>|w (weight), <name>|v (virtual clock).
-- Both carry the model's hash tag: one slot with the regions' buckets.

local DAY = 86400.0
local MIN_ACTIVE = 1.0
local MAX_LEAD_WINDOWS = 10.0

local function t_floordiv(a, b)
  return math.floor(a / b)
end

local function day_of(now)
  return math.floor(now / DAY)
end

local function civil(days)
  local z = days + 719468
  local era
  if z >= 0 then era = t_floordiv(z, 146097) else era = t_floordiv(z - 146096, 146097) end
  local doe = z - era * 146097
  local yoe = t_floordiv(doe - t_floordiv(doe, 1460) + t_floordiv(doe, 36524)
    - t_floordiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + t_floordiv(yoe, 4) - t_floordiv(yoe, 100))
  local mp = t_floordiv(5 * doy + 2, 153)
  local month
  if mp < 10 then month = mp + 3 else month = mp - 9 end
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  return year, month
end

local function days_from_civil(year, month)
  local y = year
  if month <= 2 then y = year - 1 end
  local era
  if y >= 0 then era = t_floordiv(y, 400) else era = t_floordiv(y - 399, 400) end
  local yoe = y - era * 400
  local mp
  if month <= 2 then mp = month + 9 else mp = month - 3 end
  local doy = t_floordiv(153 * mp + 2, 5)
  local doe = yoe * 365 + t_floordiv(yoe, 4) - t_floordiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local function month_of(now)
  local year, month = civil(day_of(now))
  return year * 12 + month - 1
end

local function day_reset(now)
  return (day_of(now) + 1) * DAY - now
end

local function month_reset(now)
  local year, month = civil(day_of(now))
  if month == 12 then
    year, month = year + 1, 1
  else
    month = month + 1
  end
  return days_from_civil(year, month) * DAY - now
end

local function budget_refusal(c, b, cost)
  if c.requests_capacity > 0 then
    local short = need(1.0, c.requests_capacity) - b.requests
    if short > 0 then
      if c.requests_rate > 0 then return 'rpm', short / c.requests_rate end
      return 'rpm', INF
    end
  end
  if c.tokens_capacity > 0 then
    local short = need(cost, c.tokens_capacity) - b.tokens
    if short > 0 then
      if c.tokens_rate > 0 then return 'tpm', short / c.tokens_rate end
      return 'tpm', INF
    end
  end
  return nil
end

local function quota_refusal(c, b, cost, wall)
  if c.tokens_per_day > 0 and b.day_used + cost > c.tokens_per_day then
    return 'day', day_reset(wall)
  end
  if c.tokens_per_month > 0 and b.month_used + cost > c.tokens_per_month then
    return 'month', month_reset(wall)
  end
  return nil
end

local function decay(value, elapsed, window)
  if elapsed > 0 and window > 0 then return value * math.exp(-elapsed / window) end
  return value
end

local function total(values, n)
  local out = 0.0
  for i = 1, n do out = out + values[i] end
  return out
end

-- tenancy.shares: weighted max-min water-filling, index-aligned with demands.
local function shares(demands, weights, n, capacity)
  local out, left, open = {}, capacity, {}
  for i = 1, n do
    out[i] = 0.0
    if weights[i] > 0 then open[#open + 1] = i end
  end
  while #open > 0 do
    local ws = {}
    for k, i in ipairs(open) do ws[k] = weights[i] end
    local level = left / total(ws, #open)
    local satisfied, rest = {}, {}
    for _, i in ipairs(open) do
      if demands[i] <= weights[i] * level then
        satisfied[#satisfied + 1] = i
      else
        rest[#rest + 1] = i
      end
    end
    if #satisfied == 0 then
      for _, i in ipairs(open) do out[i] = weights[i] * level end
      return out
    end
    for _, i in ipairs(satisfied) do
      out[i] = demands[i]
      left = left - demands[i]
    end
    open = rest
  end
  return out
end

-- tenancy.fair_cap over `book` (a list of {name, weight, demand, used}, sorted by name).
local function fair_cap(book, me, pool_rate, window, headroom)
  local active, mine = {}, nil
  for i, s in ipairs(book) do
    if s.demand >= MIN_ACTIVE then
      active[#active + 1] = i
      if i == me then mine = #active end
    end
  end
  if #active < 2 or mine == nil then return nil end
  local capacity = pool_rate * window
  local demands, weights = {}, {}
  for k, i in ipairs(active) do
    demands[k] = book[i].demand
    weights[k] = book[i].weight
  end
  if total(demands, #active) <= capacity then return nil end
  local alloc = shares(demands, weights, #active, capacity)
  if demands[mine] <= alloc[mine] then return nil end
  local cap = alloc[mine]
  for k = 1, #active do
    if demands[k] <= alloc[k] then return cap * (1.0 - headroom) end
  end
  return cap
end

local function fair_wait(used, cap, cost, window)
  local room = cap - cost
  if used <= room then return 0.0 end
  if room <= 0 or used <= 0 then return window end
  return window * math.log(used / room)
end

local function virtual_start(now, vclock, window)
  return math.min(math.max(now, vclock), now + MAX_LEAD_WINDOWS * window)
end

local function virtual_advance(start, cost, weight, pool_rate, active_weight)
  local rate = pool_rate
  if active_weight > 0 then rate = pool_rate * weight / active_weight end
  if rate <= 0 then return start end
  return start + cost / rate
end

-- Storage (capacity/tenants.py ClientBook).

local function parse_client(text)
  return parse_fields(text, CLIENT_FIELDS) -- as parse_limits, in CLIENT_FIELDS' order
end

local function load_budget(key, c, now)
  local v = redis.call('HMGET', key, 'tokens', 'requests', 'ts', 'day', 'day_used', 'month',
    'month_used')
  local b
  if not v[3] then
    b = { tokens = c.tokens_capacity, requests = c.requests_capacity, day = 0, day_used = 0.0,
      month = 0, month_used = 0.0 }
  else
    local elapsed = now - tonumber(v[3])
    b = { tokens = refill(tonumber(v[1]), elapsed, c.tokens_rate, c.tokens_capacity),
      requests = refill(tonumber(v[2]), elapsed, c.requests_rate, c.requests_capacity),
      day = tonumber(v[4]) or 0, day_used = tonumber(v[5]) or 0.0,
      month = tonumber(v[6]) or 0, month_used = tonumber(v[7]) or 0.0 }
  end
  local day, month = day_of(now), month_of(now)
  if b.day ~= day then b.day, b.day_used = day, 0.0 end
  if b.month ~= month then b.month, b.month_used = month, 0.0 end
  return b
end

-- A month's quota must outlive the month; the rest lives as long as the regions' keys.
local function save_budget(key, c, b, now, ttl)
  redis.call('HSET', key, 'tokens', fmt(b.tokens), 'requests', fmt(b.requests), 'ts', fmt(now),
    'day', fmt(b.day), 'day_used', fmt(b.day_used), 'month', fmt(b.month),
    'month_used', fmt(b.month_used))
  local keep = ttl
  if c.tokens_per_month > 0 then
    keep = math.max(keep, math.ceil(month_reset(now) + DAY))
  elseif c.tokens_per_day > 0 then
    keep = math.max(keep, math.ceil(day_reset(now) + DAY))
  end
  redis.call('EXPIRE', key, string.format('%d', keep))
end

-- Every client's fair-share sums, decayed to now and sorted by name; and the index of
-- `name` (nil when absent).
local function load_book(key, name, now, window)
  local raw = redis.call('HGETALL', key)
  local by = {}
  for i = 1, #raw, 2 do
    local who, field = string.match(raw[i], '^(.*)|(%a)$')
    if who then
      by[who] = by[who] or { name = who }
      by[who][field] = tonumber(raw[i + 1])
    end
  end
  local names = {}
  for who, _ in pairs(by) do names[#names + 1] = who end
  table.sort(names)
  local book, me = {}, nil
  for i, who in ipairs(names) do
    local e = by[who]
    local elapsed = now - (e.t or now)
    book[i] = { name = who, weight = e.w or 1.0, demand = decay(e.d or 0.0, elapsed, window),
      used = decay(e.u or 0.0, elapsed, window), vclock = e.v or now }
    if who == name then me = i end
  end
  return book, me
end

local function save_fair(key, e, now, ttl)
  local n = e.name
  redis.call('HSET', key, n .. '|d', fmt(e.demand), n .. '|u', fmt(e.used), n .. '|t', fmt(now),
    n .. '|w', fmt(e.weight), n .. '|v', fmt(e.vclock))
  redis.call('EXPIRE', key, string.format('%d', ttl))
end

-- The fair-share entry of `name`, created when new; the book re-sorted to include it.
local function fair_entry(book, me, name, weight, now)
  if me then
    book[me].weight = weight
    return book, me
  end
  book[#book + 1] = { name = name, weight = weight, demand = 0.0, used = 0.0, vclock = now }
  table.sort(book, function(a, b) return a.name < b.name end)
  for i, e in ipairs(book) do
    if e.name == name then return book, i end
  end
end
